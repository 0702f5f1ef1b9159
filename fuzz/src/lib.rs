//! Helpers shared by the fuzz targets that drive the install pipeline: a slot in memory and
//! the artifact hash.

use std::io;
use std::path::{Path, PathBuf};

use ddi_agent::install::slot::SlotDevice;

/// A slot device over memory; a write past its end panics (the pipeline must never do it).
pub struct MemSlot {
    path: PathBuf,
    /// The slot's bytes; its length is the capacity.
    pub data: Vec<u8>,
}

impl MemSlot {
    /// A slot of `capacity` bytes, each `fill` (so that unwritten bytes are recognisable).
    pub fn new(capacity: usize, fill: u8) -> MemSlot {
        MemSlot {
            path: PathBuf::from("mem-slot"),
            data: vec![fill; capacity],
        }
    }
}

impl SlotDevice for MemSlot {
    fn path(&self) -> &Path {
        &self.path
    }
    fn capacity(&self) -> u64 {
        self.data.len() as u64
    }
    fn write_all_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = offset as usize;
        let end = start
            .checked_add(data.len())
            .filter(|&e| e <= self.data.len())
            .expect("pipeline wrote past the end of the slot");
        self.data[start..end].copy_from_slice(data);
        Ok(())
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let start = (offset as usize).min(self.data.len());
        let n = buf.len().min(self.data.len() - start);
        buf[..n].copy_from_slice(&self.data[start..start + n]);
        Ok(n)
    }
    fn sync_range(&mut self, _offset: u64, _len: u64, _wait: bool) -> io::Result<()> {
        Ok(())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// sha256 of `data`, lower-case hex (the form the server announces).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}
