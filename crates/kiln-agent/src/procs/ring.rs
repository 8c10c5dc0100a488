//! A process's output: the newest [`RING_CAPACITY`] bytes of stdout and stderr in the order
//! they came, each chunk at its offset in the process's whole output. A slow reader never
//! holds the process up: the oldest chunks make room for new ones, and a reader that fell
//! behind resumes at the oldest byte still kept.

use std::collections::VecDeque;

use kiln_proto::OutputStream;

/// Output bytes kept per process.
pub const RING_CAPACITY: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct Ring {
    chunks: VecDeque<(OutputStream, u64, Vec<u8>)>,
    held: usize,
    start: u64,
    end: u64,
    capacity: usize,
}

impl Ring {
    pub fn new(capacity: usize) -> Ring {
        Ring {
            capacity,
            ..Default::default()
        }
    }

    /// The oldest offset still held and the offset after the newest byte.
    pub fn bounds(&self) -> (u64, u64) {
        (self.start, self.end)
    }

    pub fn push(&mut self, stream: OutputStream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.chunks.push_back((stream, self.end, data.to_vec()));
        self.end += data.len() as u64;
        self.held += data.len();
        while self.held > self.capacity {
            let Some((s, off, mut oldest)) = self.chunks.pop_front() else {
                break;
            };
            let excess = self.held - self.capacity;
            if excess < oldest.len() {
                // Keep the newest part of a chunk larger than what must go.
                oldest.drain(..excess);
                self.chunks.push_front((s, off + excess as u64, oldest));
                self.held -= excess;
            } else {
                self.held -= oldest.len();
            }
        }
        self.start = self.chunks.front().map_or(self.end, |c| c.1);
    }

    /// Up to `max` bytes of one stream from `from` on (or from the oldest byte held when
    /// `from` is older): `(stream, offset, bytes)`, or `None` when nothing new is held.
    pub fn read(&self, from: u64, max: usize) -> Option<(OutputStream, u64, &[u8])> {
        let from = from.max(self.start);
        // Chunks are in offset order: the first one that ends after `from`.
        let i = self
            .chunks
            .partition_point(|(_, off, data)| off + data.len() as u64 <= from);
        let (stream, off, data) = self.chunks.get(i)?;
        let skip = (from - off) as usize;
        let take = (data.len() - skip).min(max);
        Some((*stream, from, &data[skip..skip + take]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OutputStream::{Stderr, Stdout};

    #[test]
    fn reads_back_in_order_with_offsets() {
        let mut r = Ring::new(100);
        r.push(Stdout, b"hello ");
        r.push(Stderr, b"err");
        r.push(Stdout, b"world");
        assert_eq!(r.read(0, 100), Some((Stdout, 0, &b"hello "[..])));
        assert_eq!(r.read(6, 100), Some((Stderr, 6, &b"err"[..])));
        assert_eq!(r.read(7, 100), Some((Stderr, 7, &b"rr"[..])));
        assert_eq!(r.read(9, 3), Some((Stdout, 9, &b"wor"[..])));
        assert_eq!(r.read(14, 100), None);
        assert_eq!(r.bounds(), (0, 14));
    }

    #[test]
    fn drops_the_oldest_bytes_beyond_capacity() {
        let mut r = Ring::new(8);
        r.push(Stdout, b"abcdef");
        r.push(Stdout, b"ghij");
        // 10 bytes came, 8 are kept: "cdefghij".
        assert_eq!(r.bounds(), (2, 10));
        assert_eq!(r.read(0, 100), Some((Stdout, 2, &b"cdef"[..])));
        r.push(Stderr, b"0123456789");
        assert_eq!(r.bounds(), (12, 20));
        assert_eq!(r.read(5, 100), Some((Stderr, 12, &b"23456789"[..])));
        assert!(r.held <= 8);
    }
}
