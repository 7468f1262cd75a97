// The admin API's OpenAPI document, as the server serves it, validates against the
// OpenAPI 3.0 schema, and every admin route the server answers is in it.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import SwaggerParser from '@apidevtools/swagger-parser';
import { startServer, admin } from './harness.mjs';

let server;
before(async () => { server = await startServer(); });
after(async () => { await server?.stop(); });

test('the OpenAPI document validates and names every route', async () => {
  const res = await fetch(`${server.base}/admin/v1/openapi.json`);
  assert.equal(res.status, 200);
  const doc = await res.json();
  const api = await SwaggerParser.validate(structuredClone(doc));
  assert.equal(api.info.title, 'Tether admin API');
  const routes = [
    ['get', '/admin/v1/health'],
    ['get', '/admin/v1/users/{user}/sessions'],
    ['get', '/admin/v1/users/{user}/presence'],
    ['post', '/admin/v1/users/{user}/messages'],
    ['post', '/admin/v1/users/{user}/devices/{device}/kick'],
    ['post', '/admin/v1/users/{user}/devices/{device}/revoke'],
  ];
  for (const [method, path] of routes) {
    assert.ok(doc.paths[path]?.[method], `${method} ${path} is documented`);
    // And the server has it: without the token it answers 401, not 404.
    const concrete = path.replace('{user}', 'ann').replace('{device}', 'phone');
    const r = await admin(server, method.toUpperCase(), concrete, method === 'post' ? {} : undefined, null);
    assert.equal(r.status, 401, `${method} ${concrete}`);
  }
  // The health answer has the fields the document requires.
  const health = await admin(server, 'GET', '/admin/v1/health');
  for (const field of doc.components.schemas.Health.required) assert.ok(field in health.json, field);
});
