//! One lab: four namespaces wired into a client with two uplinks (two NAT routers,
//! "Wi-Fi" and "cellular") and a server, plus the knobs a scenario turns while it runs.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::LabError;
use crate::netns::{self, require_root};
use crate::registry::{self, Claim, Orphans};
use crate::tools::{self, Tool, run};
use crate::topology::{self, Names};

/// One NAT router's behaviour at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterSpec {
    /// How long an idle established TCP mapping lives; whole seconds, at least 1.
    pub nat_timeout: Duration,
}

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabSpec {
    /// Names the lab's namespaces and interfaces (ASCII letters and digits, at most 11);
    /// `None` generates a short unique one.
    pub tag: Option<String>,
    /// Router 0 (active at start) and router 1.
    pub routers: [RouterSpec; 2],
}

impl LabSpec {
    /// A lab with a generated tag whose two routers forget idle mappings after `nat_timeout`.
    pub fn with_nat_timeout(nat_timeout: Duration) -> LabSpec {
        LabSpec {
            tag: None,
            routers: [RouterSpec { nat_timeout }; 2],
        }
    }
}

/// What a router currently does to traffic.
#[derive(Clone, Copy, Debug)]
struct RouterState {
    nat_timeout: Duration,
    loss_percent: u8,
    blackhole: bool,
}

#[derive(Debug)]
struct LabState {
    routers: [RouterState; 2],
    active_router: usize,
}

/// A running lab. Dropping it tears everything down (best effort, never panics).
///
/// Namespaces: `{tag}-c` (client), `{tag}-r0`, `{tag}-r1` (routers), `{tag}-s` (server).
/// The client is `10.20i.1.2` toward router `i`; the server answers on
/// [`Lab::server_ip`] through either router and sees router `i`'s NAT address
/// [`Lab::router_nat_ip`] as the peer.
#[derive(Debug)]
pub struct Lab {
    tag: String,
    names: Names,
    state: Mutex<LabState>,
    torn_down: bool,
}

impl Lab {
    /// Builds the lab, after checking the spec, privileges and tools. With an explicit
    /// tag, a stale lab of that tag (owner process dead) is deleted first and a live one
    /// is an error; a generated tag first runs [`crate::cleanup_stale`] on generated tags.
    pub fn create(spec: LabSpec) -> Result<Lab, LabError> {
        let timeouts = [
            topology::timeout_secs(spec.routers[0].nat_timeout)?,
            topology::timeout_secs(spec.routers[1].nat_timeout)?,
        ];
        if let Some(tag) = &spec.tag {
            topology::validate_tag(tag)?;
        }
        require_root()?;
        for tool in Tool::REQUIRED {
            tool.path()?;
        }
        let tag = match spec.tag {
            Some(tag) => match registry::claim(&tag, Orphans::Delete)? {
                Claim::Taken => tag,
                Claim::Busy { pid } => return Err(LabError::TagInUse { tag, pid }),
            },
            None => registry::claim_generated()?,
        };
        // From here on the tag is registered: dropping `lab` on an error deletes whatever
        // was built.
        let lab = Lab {
            names: Names::new(&tag),
            tag,
            state: Mutex::new(LabState {
                routers: spec.routers.map(|r| RouterState {
                    nat_timeout: r.nat_timeout,
                    loss_percent: 0,
                    blackhole: false,
                }),
                active_router: 0,
            }),
            torn_down: false,
        };
        lab.build(timeouts)?;
        tracing::info!(tag = %lab.tag, "network lab up");
        Ok(lab)
    }

    fn build(&self, timeouts: [u64; 2]) -> Result<(), LabError> {
        let tag = &self.tag;
        let names = &self.names;
        for ns in names.namespaces() {
            let mut command = Tool::Ip.command()?;
            command.args(["netns", "add", ns]);
            run(command, None)?;
        }
        // Sysctls first: `default.rp_filter` applies to interfaces created afterwards.
        self.sysctl(&names.client, topology::HOST_SYSCTLS)?;
        self.sysctl(&names.server, topology::HOST_SYSCTLS)?;
        for (i, secs) in timeouts.into_iter().enumerate() {
            self.sysctl(&names.routers[i], topology::router_sysctls(secs))?;
        }
        for i in 0..2 {
            let router = &names.routers[i];
            veth(
                (&topology::client_if(tag, i), &names.client),
                (&topology::router_client_if(tag, i), router),
            )?;
            veth(
                (&topology::router_server_if(tag, i), router),
                (&topology::server_if(tag, i), &names.server),
            )?;
        }
        ip_batch(&names.server, &topology::server_batch(tag))?;
        for i in 0..2 {
            ip_batch(&names.routers[i], &topology::router_batch(tag, i))?;
            self.nft(i, &topology::router_ruleset(tag, i))?;
        }
        ip_batch(&names.client, &topology::client_batch(tag))?;
        Ok(())
    }

    /// The tag every name of this lab derives from.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The server's service address, reachable through either router.
    pub fn server_ip() -> Ipv4Addr {
        topology::addr(0, 2, 2)
    }

    /// The address the server sees for a client behind router `i` (the NAT's outside).
    /// Panics if `i` is not 0 or 1.
    pub fn router_nat_ip(router: usize) -> Ipv4Addr {
        assert!(router < 2, "router {router} does not exist");
        topology::addr(router, 2, 1)
    }

    /// The client's own address on its link to router `i`. Panics if `i` is not 0 or 1.
    pub fn client_ip(router: usize) -> Ipv4Addr {
        assert!(router < 2, "router {router} does not exist");
        topology::addr(router, 1, 2)
    }

    /// The client's namespace.
    pub fn client_ns(&self) -> &str {
        &self.names.client
    }

    /// The server's namespace.
    pub fn server_ns(&self) -> &str {
        &self.names.server
    }

    /// Router `i`'s namespace. Panics if `i` is not 0 or 1.
    pub fn router_ns(&self, i: usize) -> &str {
        &self.names.routers[i]
    }

    /// Changes how long router `i` keeps an idle mapping. Existing mappings take the new
    /// timeout at their next packet.
    pub fn set_nat_timeout(&self, router: usize, t: Duration) -> Result<(), LabError> {
        check_router(router)?;
        let secs = topology::timeout_secs(t)?;
        let mut state = self.state();
        self.sysctl(
            &self.names.routers[router],
            [topology::timeout_sysctl(secs)],
        )?;
        state.routers[router].nat_timeout = t;
        Ok(())
    }

    /// Router `i`'s current NAT timeout. Panics if `i` is not 0 or 1.
    pub fn nat_timeout(&self, router: usize) -> Duration {
        self.state().routers[router].nat_timeout
    }

    /// Drops `percent` % of the packets entering router `i` from either side (so each
    /// direction loses that share, and a round trip about twice as much). 0 turns it off.
    pub fn set_loss(&self, router: usize, percent: u8) -> Result<(), LabError> {
        check_router(router)?;
        if percent > 100 {
            return Err(LabError::InvalidLoss(percent));
        }
        self.impair(router, |r| r.loss_percent = percent)
    }

    /// Drops every packet entering router `i` ("cable pulled"); no error reaches either end.
    /// While on, it overrides the loss setting, which returns when it is turned off.
    pub fn blackhole(&self, router: usize, on: bool) -> Result<(), LabError> {
        check_router(router)?;
        self.impair(router, |r| r.blackhole = on)
    }

    fn impair(&self, router: usize, change: impl FnOnce(&mut RouterState)) -> Result<(), LabError> {
        let mut state = self.state();
        let mut next = state.routers[router];
        change(&mut next);
        let ruleset =
            topology::impairment_ruleset(&self.tag, router, next.loss_percent, next.blackhole);
        self.nft(router, &ruleset)?;
        state.routers[router] = next;
        Ok(())
    }

    /// Points the client's default route at router `i` ("the phone changed networks").
    /// Flows through the old router die: their packets now reach a router with no mapping
    /// for them, which drops them silently. New connections use the new router.
    pub fn use_router(&self, router: usize) -> Result<(), LabError> {
        check_router(router)?;
        let mut state = self.state();
        let gateway = topology::addr(router, 1, 1).to_string();
        let mut command = Tool::Ip.command()?;
        command.args([
            "-n",
            &self.names.client,
            "route",
            "replace",
            "default",
            "via",
            &gateway,
        ]);
        run(command, None)?;
        state.active_router = router;
        Ok(())
    }

    /// The router the client's default route points at.
    pub fn active_router(&self) -> usize {
        self.state().active_router
    }

    /// How many TCP mappings router `i` holds toward server port `dport`
    /// (`conntrack -L -p tcp --dport`), whatever their TCP state.
    pub fn conntrack_entries(&self, router: usize, dport: u16) -> Result<usize, LabError> {
        check_router(router)?;
        let mut command = Tool::Conntrack.command_in(&self.names.routers[router])?;
        command.args(["-L", "-p", "tcp", "--dport", &dport.to_string()]);
        Ok(topology::count_tcp_entries(&run(command, None)?))
    }

    /// `ip netns exec ns program`: a command to configure and run inside namespace `ns`.
    /// If `ip` cannot be found it is looked up in `PATH` when the command is spawned.
    pub fn command_in(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        let ip = Tool::Ip.path().unwrap_or_else(|_| "ip".into());
        tools::netns_exec(ip, ns, program)
    }

    /// Runs `f` on a new thread that has entered namespace `ns`: sockets it creates live
    /// there (and keep living there when handed to other threads). Build a tokio
    /// current-thread runtime inside `f` for async code. Panics if the namespace cannot
    /// be entered.
    pub fn spawn_thread_in<F, R>(&self, ns: &str, name: &str, f: F) -> JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        netns::spawn_thread_in(ns, name, f)
    }

    /// Deletes the namespaces (and with them the veths) and the pid file. Idempotent;
    /// does nothing if [`crate::teardown_all`] got there first.
    pub fn teardown(&mut self) {
        if !self.torn_down {
            self.torn_down = true;
            if registry::release(&self.tag) {
                tracing::info!(tag = %self.tag, "network lab down");
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, LabState> {
        // A panic mid-change leaves the last applied settings recorded: still valid.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sysctl<S: AsRef<str>>(
        &self,
        ns: &str,
        settings: impl IntoIterator<Item = S>,
    ) -> Result<(), LabError> {
        let mut command = Tool::Sysctl.command_in(ns)?;
        command.arg("-q").arg("-w");
        command.args(settings.into_iter().map(|s| s.as_ref().to_owned()));
        run(command, None).map(drop)
    }

    fn nft(&self, router: usize, ruleset: &str) -> Result<(), LabError> {
        let mut command = Tool::Nft.command_in(&self.names.routers[router])?;
        command.args(["-f", "-"]);
        run(command, Some(ruleset)).map(drop)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn check_router(router: usize) -> Result<(), LabError> {
    if router < 2 {
        Ok(())
    } else {
        Err(LabError::NoSuchRouter(router))
    }
}

/// Creates a veth pair with each end directly in its namespace, so the names never
/// appear in the root namespace (where parallel labs would collide).
fn veth((a, a_ns): (&str, &str), (b, b_ns): (&str, &str)) -> Result<(), LabError> {
    let mut command = Tool::Ip.command()?;
    command.args([
        "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns", b_ns,
    ]);
    run(command, None).map(drop)
}

/// Runs `ip -batch` lines inside namespace `ns`.
fn ip_batch(ns: &str, lines: &str) -> Result<(), LabError> {
    let mut command = Tool::Ip.command()?;
    command.args(["-n", ns, "-batch", "-"]);
    run(command, Some(lines)).map(drop)
}
