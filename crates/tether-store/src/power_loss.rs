//! A data file whose unsynced writes die with the process: SIGKILL becomes a power cut.
//!
//! [`SimulatedDisk`](crate::SimulatedDisk) cuts the power inside one process. A chaos
//! run needs it across processes: a real `tether serve` killed with SIGKILL at a random
//! moment, then restarted on the same data directory. kill -9 alone keeps every write
//! in the kernel's page cache, so it never loses what a power cut loses. This backend
//! keeps every write made since the last `sync_data` in process memory (page-granular
//! overlay) and puts it in the file only at `sync_data`, followed by a real fdatasync.
//! When the process dies the overlay dies with it: the file holds what was synced, plus,
//! as after a real power cut, a random part of the rest, because each written page is,
//! with probability `writeback`, written through at once (the kernel flushing a dirty
//! page early), in no particular order.
//!
//! Only for tests and chaos runs (`tether serve --simulate-power-loss SEED`).

use parking_lot::Mutex;
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Page size of the overlay.
const PAGE: u64 = 4096;

/// See the module documentation.
#[derive(Debug)]
pub struct PowerLossFile {
    file: File,
    state: Mutex<Overlay>,
}

#[derive(Debug)]
struct Overlay {
    /// Pages written since the last sync and not written through.
    pages: HashMap<u64, Box<[u8]>>,
    /// Length as the store sees it.
    len: u64,
    /// Length of the real file.
    file_len: u64,
    /// The store shrank the file to here since the last sync: real bytes from here on
    /// are stale and read as zeros, except pages written through since.
    zero_from: u64,
    /// Pages written through since the last sync.
    through: std::collections::HashSet<u64>,
    rng: StdRng,
    writeback: f64,
}

impl PowerLossFile {
    /// Wraps an open data file. `writeback` (0 to 1) is the chance that a written page
    /// reaches the file before the next sync; `seed` makes the choice repeatable.
    pub fn new(file: File, seed: u64, writeback: f64) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            state: Mutex::new(Overlay {
                pages: HashMap::new(),
                len,
                file_len: len,
                zero_from: u64::MAX,
                through: Default::default(),
                rng: StdRng::seed_from_u64(seed),
                writeback: writeback.clamp(0.0, 1.0),
            }),
        })
    }

    /// Bytes written but not yet in the file (what a crash now would lose).
    pub fn unsynced_pages(&self) -> usize {
        self.state.lock().pages.len()
    }
}

impl Overlay {
    /// Reads `out.len()` bytes of the file at `offset`, zeros past its end.
    fn read_file(&self, file: &File, offset: u64, out: &mut [u8]) -> io::Result<()> {
        out.fill(0);
        let stale = offset >= self.zero_from && !self.through.contains(&(offset / PAGE));
        if offset >= self.file_len || stale {
            return Ok(());
        }
        let n = ((self.file_len - offset) as usize).min(out.len());
        file.read_exact_at(&mut out[..n], offset)
    }

    /// Writes page `index` to the file, clipped to the store's length.
    fn write_through(&mut self, file: &File, index: u64, page: &[u8]) -> io::Result<()> {
        let start = index * PAGE;
        if start >= self.len {
            return Ok(());
        }
        // Up to the store's length, or over the whole page where the real file goes
        // further (its bytes past a shrink must become the page's zeros, not stay stale).
        let end = self.len.max(self.file_len);
        let n = ((end - start) as usize).min(page.len());
        file.write_all_at(&page[..n], start)?;
        self.file_len = self.file_len.max(start + n as u64);
        if start + PAGE > self.zero_from {
            self.through.insert(index);
        }
        Ok(())
    }
}

fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len} bytes at {offset} beyond the file's length {size}"),
        )),
    }
}

impl redb::StorageBackend for PowerLossFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.state.lock();
        check_range(offset, out.len(), state.len)?;
        let mut done = 0usize;
        while done < out.len() {
            let at = offset + done as u64;
            let index = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = (PAGE as usize - within).min(out.len() - done);
            let dst = &mut out[done..done + n];
            match state.pages.get(&index) {
                Some(page) => dst.copy_from_slice(&page[within..within + n]),
                None => state.read_file(&self.file, at, dst)?,
            }
            done += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        if len < state.len {
            // Bytes past the new end read back as zeros if the file grows again. The
            // page holding the new end moves to the overlay with its tail zeroed, so
            // whole pages from `zero_from` on are stale in the real file.
            let tail = len / PAGE;
            if !len.is_multiple_of(PAGE) && !state.pages.contains_key(&tail) {
                let mut page = vec![0u8; PAGE as usize].into_boxed_slice();
                state.read_file(&self.file, tail * PAGE, &mut page)?;
                state.pages.insert(tail, page);
            }
            if let Some(page) = state.pages.get_mut(&tail) {
                page[(len % PAGE) as usize..].fill(0);
            }
            state.pages.retain(|index, _| index * PAGE < len);
            let boundary = tail * PAGE + if len.is_multiple_of(PAGE) { 0 } else { PAGE };
            state.zero_from = state.zero_from.min(boundary);
            state.through.retain(|index| index * PAGE < len);
        }
        state.len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        let pages = std::mem::take(&mut state.pages);
        for (index, page) in &pages {
            state.write_through(&self.file, *index, page)?;
        }
        // Stale pages past a shrink that were not written since become zeros.
        if state.zero_from < state.len.min(state.file_len) {
            let zeros = vec![0u8; PAGE as usize];
            let mut index = state.zero_from / PAGE;
            while index * PAGE < state.len.min(state.file_len) {
                if !state.through.contains(&index) {
                    state.write_through(&self.file, index, &zeros)?;
                }
                index += 1;
            }
        }
        state.zero_from = u64::MAX;
        state.through.clear();
        if state.file_len != state.len {
            self.file.set_len(state.len)?;
            state.file_len = state.len;
        }
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.state.lock();
        check_range(offset, data.len(), state.len)?;
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let index = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = (PAGE as usize - within).min(data.len() - done);
            let mut page = match state.pages.remove(&index) {
                Some(page) => page,
                None => {
                    let mut page = vec![0u8; PAGE as usize].into_boxed_slice();
                    state.read_file(&self.file, index * PAGE, &mut page)?;
                    page
                }
            };
            page[within..within + n].copy_from_slice(&data[done..done + n]);
            let writeback = state.writeback;
            if state.rng.random_bool(writeback) {
                state.write_through(&self.file, index, &page)?;
            } else {
                state.pages.insert(index, page);
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::StorageBackend;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path, writeback: f64) -> PowerLossFile {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        PowerLossFile::new(file, 7, writeback).unwrap()
    }

    fn read_all(b: &PowerLossFile) -> Vec<u8> {
        let mut out = vec![0; b.len().unwrap() as usize];
        b.read(0, &mut out).unwrap();
        out
    }

    #[test]
    fn unsynced_writes_are_visible_to_the_process_but_not_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let b = open(&path, 0.0);
        b.set_len(3 * PAGE).unwrap();
        b.write(PAGE - 2, b"abcd").unwrap();
        assert_eq!(&read_all(&b)[PAGE as usize - 2..PAGE as usize + 2], b"abcd");
        // The process "dies" here: the file never saw the write, nor the length.
        drop(b);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn sync_puts_everything_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let b = open(&path, 0.0);
        b.set_len(2 * PAGE + 10).unwrap();
        b.write(5, b"hello").unwrap();
        b.write(2 * PAGE + 2, b"tail").unwrap();
        b.sync_data().unwrap();
        assert_eq!(b.unsynced_pages(), 0);
        drop(b);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, 2 * PAGE + 10);
        assert_eq!(&bytes[5..10], b"hello");
        assert_eq!(
            &bytes[2 * PAGE as usize + 2..2 * PAGE as usize + 6],
            b"tail"
        );
        // Reopened, the synced image reads back.
        let again = open(&path, 0.0);
        assert_eq!(read_all(&again), bytes);
    }

    #[test]
    fn early_writeback_lets_some_unsynced_pages_through_and_keeps_the_rest_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let b = open(&path, 0.0);
        b.set_len(64 * PAGE).unwrap();
        b.sync_data().unwrap();
        drop(b);
        let b = open(&path, 0.5);
        for page in 0..64 {
            b.write(page * PAGE, &[0xAB; 8]).unwrap();
        }
        let kept = b.unsynced_pages();
        assert!(kept > 10 && kept < 54, "{kept} of 64 pages held back");
        assert!(
            read_all(&b)
                .chunks(PAGE as usize)
                .all(|p| p[..8] == [0xAB; 8])
        );
        drop(b);
        let bytes = std::fs::read(&path).unwrap();
        let through = bytes
            .chunks(PAGE as usize)
            .filter(|p| p[..8] == [0xAB; 8])
            .count();
        assert_eq!(through, 64 - kept);
    }

    #[test]
    fn shrinking_then_growing_reads_zeros_past_the_old_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let b = open(&path, 0.0);
        b.set_len(2 * PAGE).unwrap();
        b.write(PAGE, &[1; 100]).unwrap();
        b.sync_data().unwrap();
        b.set_len(PAGE + 50).unwrap();
        b.set_len(2 * PAGE).unwrap();
        let bytes = read_all(&b);
        assert!(
            bytes[PAGE as usize..PAGE as usize + 50]
                .iter()
                .all(|&x| x == 1)
        );
        assert!(bytes[PAGE as usize + 50..].iter().all(|&x| x == 0));
        // Shrink by whole pages, grow back, sync: the file holds zeros there too.
        b.set_len(4 * PAGE).unwrap();
        b.write(3 * PAGE, &[2; 10]).unwrap();
        b.sync_data().unwrap();
        b.set_len(PAGE).unwrap();
        b.set_len(4 * PAGE).unwrap();
        assert!(read_all(&b)[PAGE as usize..].iter().all(|&x| x == 0));
        b.sync_data().unwrap();
        drop(b);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, 4 * PAGE);
        assert!(bytes[PAGE as usize..].iter().all(|&x| x == 0));
    }

    #[test]
    fn a_store_on_it_keeps_every_commit_that_returned_across_a_crash() {
        use crate::{Action, AppendRequest, Durability, EmbeddedStore, InboxTarget, Store};
        let dir = tempfile::tempdir().unwrap();
        let open_store = || {
            let file = |name: &str| -> Box<dyn redb::StorageBackend> {
                Box::new(open(&dir.path().join(name), 0.3))
            };
            EmbeddedStore::with_backends(
                open(&dir.path().join("db"), 0.3),
                [file("journal.0"), file("journal.1")],
                Durability::Fsync,
                None,
            )
            .unwrap()
        };
        let request = |n: u8| AppendRequest {
            sender: "alice".into(),
            sender_device: "phone".into(),
            client_msg_id: [n; 16],
            action: Action::Message(vec![InboxTarget {
                user: "bob".into(),
                conversation: "alice".into(),
            }]),
            body: bytes::Bytes::from(vec![n; 300]),
            content_type: String::new(),
            ts_ms: 1,
        };
        for round in 0..3u8 {
            let store = open_store();
            // Checkpoints now and then, so a crash finds some in the database.
            store.set_checkpoint_policy(std::time::Duration::from_secs(60), 30);
            assert_eq!(store.inbox_info("bob").unwrap().head, u64::from(round) * 20);
            for n in 0..20 {
                store.append(&[request(round * 20 + n)]).unwrap();
            }
            // Dies without closing: whatever was not synced is gone.
            store.abandon();
        }
        let store = open_store();
        let entries = store.read_range("bob", 1, 60, 100).unwrap();
        assert_eq!(entries.len(), 60);
        assert!(
            entries
                .iter()
                .enumerate()
                .all(|(i, e)| e.body[0] == i as u8)
        );
    }
}
