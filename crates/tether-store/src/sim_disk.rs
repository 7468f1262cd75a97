//! A fault-injecting disk for power-cut tests (DESIGN §9).
//!
//! kill -9 does not test fsync: the page cache survives a process crash. What a power cut
//! loses is every byte the store wrote but did not sync, so [`SimulatedDisk`] keeps two
//! images: `current`, what the process reads back, and `durable`, what the last
//! `sync_data` made permanent. [`SimulatedDisk::power_cut`] starts a new disk from the
//! durable image alone; [`SimulatedDisk::power_cut_torn`] additionally lets a random subset
//! of the unsynced 4 KiB chunks through, as a disk that persisted part of an interrupted
//! flush would; [`SimulatedDisk::cut_power_after`] makes the power fail in the middle of a
//! commit, between any two writes or syncs.
//!
//! A disk holds several files (the store's database and its two log files); a power cut
//! hits all of them at once. The disk itself is file 0 and [`SimulatedDisk::file`] gives
//! the others; each implements [`redb::StorageBackend`], so an
//! [`EmbeddedStore`](crate::EmbeddedStore) runs on it unchanged through
//! [`EmbeddedStore::open_with_backend`](crate::EmbeddedStore::open_with_backend).

use parking_lot::Mutex;
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::fmt;
use std::io;
use std::sync::Arc;

/// Granularity at which [`SimulatedDisk::power_cut_torn`] keeps or drops unsynced writes.
pub const TORN_CHUNK: u64 = 4096;

/// A simulated disk that loses unsynced bytes at a power cut. Clones share the same disk.
/// As a storage backend it is its file 0.
#[derive(Clone, Default)]
pub struct SimulatedDisk {
    state: Arc<Mutex<DiskState>>,
    file: usize,
}

#[derive(Default)]
struct DiskState {
    files: Vec<FileImage>,
    /// `sync_data` calls that succeeded, on any file.
    syncs: u64,
    /// Mutating calls (write, set_len, sync) still allowed before the power fails.
    power_left: Option<u64>,
}

#[derive(Default)]
struct FileImage {
    /// What the process sees.
    current: Vec<u8>,
    /// What survived the last sync.
    durable: Vec<u8>,
    /// Changes since the last sync, in order: what a torn power cut may partly keep.
    unsynced: Vec<Unsynced>,
}

enum Unsynced {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

impl SimulatedDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// File `index` of the same disk (0 is the disk itself), created empty on first use.
    pub fn file(&self, index: usize) -> SimulatedDisk {
        SimulatedDisk {
            state: self.state.clone(),
            file: index,
        }
    }

    /// The disk as found after a power loss now: a new disk holding only the synced images.
    pub fn power_cut(&self) -> SimulatedDisk {
        let state = self.state.lock();
        Self::from_images(state.files.iter().map(|f| f.durable.clone()).collect())
    }

    /// Like [`power_cut`](Self::power_cut), but a random subset (chosen by `seed`) of the
    /// unsynced writes, cut into page-aligned [`TORN_CHUNK`]s, and of the unsynced length
    /// changes reached the platter before the power went.
    pub fn power_cut_torn(&self, seed: u64) -> SimulatedDisk {
        let state = self.state.lock();
        let mut rng = StdRng::seed_from_u64(seed);
        let images = state.files.iter().map(|file| file.torn(&mut rng)).collect();
        Self::from_images(images)
    }

    /// Makes the power fail after `ops` more writes, length changes or syncs: that call and
    /// every later one (reads included) returns an I/O error, as from a dead disk.
    pub fn cut_power_after(&self, ops: u64) {
        self.state.lock().power_left = Some(ops);
    }

    /// Number of successful `sync_data` calls on this disk.
    pub fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    fn from_images(images: Vec<Vec<u8>>) -> SimulatedDisk {
        let files = images
            .into_iter()
            .map(|image| FileImage {
                current: image.clone(),
                durable: image,
                unsynced: Vec::new(),
            })
            .collect();
        SimulatedDisk {
            state: Arc::new(Mutex::new(DiskState {
                files,
                ..DiskState::default()
            })),
            file: 0,
        }
    }
}

impl FileImage {
    /// The durable image plus a random subset of the unsynced changes, in
    /// [`TORN_CHUNK`]s.
    fn torn(&self, rng: &mut StdRng) -> Vec<u8> {
        let mut image = self.durable.clone();
        for change in &self.unsynced {
            match change {
                Unsynced::SetLen(len) => {
                    if rng.random_bool(0.5) {
                        image.resize(to_usize(*len), 0);
                    }
                }
                Unsynced::Write { offset, data } => {
                    let mut start = *offset;
                    let end = offset + data.len() as u64;
                    while start < end {
                        let chunk_end = ((start / TORN_CHUNK + 1) * TORN_CHUNK).min(end);
                        if rng.random_bool(0.5) {
                            let from = to_usize(start - offset);
                            let to = to_usize(chunk_end - offset);
                            let at = to_usize(start);
                            if image.len() < at + (to - from) {
                                image.resize(at + (to - from), 0);
                            }
                            image[at..at + (to - from)].copy_from_slice(&data[from..to]);
                        }
                        start = chunk_end;
                    }
                }
            }
        }
        image
    }
}

impl DiskState {
    fn powered(&self) -> io::Result<()> {
        match self.power_left {
            Some(0) => Err(io::Error::other("simulated power failure")),
            _ => Ok(()),
        }
    }

    /// Spends one mutating call of the remaining power, failing if none is left.
    fn spend(&mut self) -> io::Result<()> {
        self.powered()?;
        if let Some(left) = &mut self.power_left {
            *left -= 1;
        }
        Ok(())
    }

    fn file(&mut self, index: usize) -> &mut FileImage {
        if self.files.len() <= index {
            self.files.resize_with(index + 1, FileImage::default);
        }
        &mut self.files[index]
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn out_of_range(offset: u64, len: usize, size: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("simulated disk: {len} bytes at {offset} beyond its length {size}"),
    )
}

/// The slice `offset..offset + len` of a disk of `size` bytes, if it lies inside it.
fn span(offset: u64, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
    usize::try_from(offset)
        .ok()
        .and_then(|start| Some(start..start.checked_add(len)?))
        .filter(|range| range.end <= size)
        .ok_or_else(|| out_of_range(offset, len, size))
}

impl redb::StorageBackend for SimulatedDisk {
    fn len(&self) -> io::Result<u64> {
        let mut state = self.state.lock();
        state.powered()?;
        Ok(state.file(self.file).current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let mut state = self.state.lock();
        state.powered()?;
        let file = state.file(self.file);
        let range = span(offset, out.len(), file.current.len())?;
        out.copy_from_slice(&file.current[range]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        state.spend()?;
        let new_len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
        let file = state.file(self.file);
        file.current.resize(new_len, 0);
        file.unsynced.push(Unsynced::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        state.spend()?;
        let file = state.file(self.file);
        file.durable.clone_from(&file.current);
        file.unsynced.clear();
        state.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.state.lock();
        state.spend()?;
        let file = state.file(self.file);
        let range = span(offset, data.len(), file.current.len())?;
        file.current[range].copy_from_slice(data);
        file.unsynced.push(Unsynced::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }
}

impl fmt::Debug for SimulatedDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        let empty = FileImage::default();
        let file = state.files.get(self.file).unwrap_or(&empty);
        f.debug_struct("SimulatedDisk")
            .field("current_len", &file.current.len())
            .field("durable_len", &file.durable.len())
            .field("unsynced_changes", &file.unsynced.len())
            .field("syncs", &state.syncs)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::StorageBackend;

    fn read_all(disk: &SimulatedDisk) -> Vec<u8> {
        let len = disk.len().unwrap() as usize;
        let mut out = vec![0; len];
        disk.read(0, &mut out).unwrap();
        out
    }

    #[test]
    fn power_cut_keeps_synced_bytes_and_drops_the_rest() {
        let disk = SimulatedDisk::new();
        disk.set_len(8).unwrap();
        disk.write(0, b"synced..").unwrap();
        disk.sync_data().unwrap();
        disk.write(0, b"lost").unwrap();
        disk.set_len(16).unwrap();
        assert_eq!(read_all(&disk), b"losted..\0\0\0\0\0\0\0\0");

        let after = disk.power_cut();
        assert_eq!(read_all(&after), b"synced..");
        assert_eq!(disk.syncs(), 1);
        assert_eq!(after.syncs(), 0);
    }

    #[test]
    fn power_cut_disk_is_independent_of_the_old_one() {
        let disk = SimulatedDisk::new();
        disk.set_len(4).unwrap();
        disk.sync_data().unwrap();
        let after = disk.power_cut();
        disk.write(0, b"late").unwrap();
        disk.sync_data().unwrap();
        assert_eq!(read_all(&after), [0; 4]);
    }

    #[test]
    fn torn_power_cut_keeps_whole_aligned_chunks_of_unsynced_writes() {
        let disk = SimulatedDisk::new();
        let len = 4 * TORN_CHUNK as usize;
        disk.set_len(len as u64).unwrap();
        disk.sync_data().unwrap();
        // One write spanning chunk boundaries at an unaligned offset: 5 pieces.
        disk.write(100, &vec![0xAB; len - 200]).unwrap();

        let mut saw_some_kept = false;
        let mut saw_some_dropped = false;
        for seed in 0..32 {
            let image = read_all(&disk.power_cut_torn(seed));
            assert_eq!(image.len(), len);
            for (i, chunk) in image.chunks(TORN_CHUNK as usize).enumerate() {
                let chunk_start = i * TORN_CHUNK as usize;
                let covered = (chunk_start..chunk_start + chunk.len())
                    .filter(|at| (100..len - 100).contains(at))
                    .count();
                let landed = chunk.iter().filter(|b| **b == 0xAB).count();
                // Within a chunk, the write landed entirely or not at all.
                assert!(landed == 0 || landed == covered, "seed {seed} chunk {i}");
                saw_some_kept |= landed > 0;
                saw_some_dropped |= landed == 0;
            }
        }
        assert!(saw_some_kept && saw_some_dropped);
    }

    #[test]
    fn torn_power_cut_keeps_nothing_after_a_sync() {
        let disk = SimulatedDisk::new();
        disk.set_len(TORN_CHUNK).unwrap();
        disk.write(0, &[7; 10]).unwrap();
        disk.sync_data().unwrap();
        for seed in 0..8 {
            assert_eq!(read_all(&disk.power_cut_torn(seed)), read_all(&disk));
        }
    }

    #[test]
    fn cut_power_after_fails_that_call_and_every_later_one() {
        let disk = SimulatedDisk::new();
        disk.cut_power_after(2);
        disk.set_len(4).unwrap();
        disk.write(0, b"ok").unwrap();
        assert!(disk.write(2, b"no").is_err());
        assert!(disk.sync_data().is_err());
        assert!(disk.len().is_err());
        assert_eq!(disk.syncs(), 0);
        assert_eq!(read_all(&disk.power_cut()), b"");
    }

    #[test]
    fn out_of_range_access_is_an_error_not_a_panic() {
        let disk = SimulatedDisk::new();
        disk.set_len(4).unwrap();
        assert!(disk.write(2, b"abc").is_err());
        assert!(disk.read(u64::MAX, &mut [0; 2]).is_err());
    }

    #[test]
    fn debug_reports_sizes_not_contents() {
        let disk = SimulatedDisk::new();
        disk.set_len(3).unwrap();
        assert_eq!(
            format!("{disk:?}"),
            "SimulatedDisk { current_len: 3, durable_len: 0, unsynced_changes: 1, syncs: 0 }"
        );
    }
}
