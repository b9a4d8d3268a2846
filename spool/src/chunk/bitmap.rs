//! Which records of a chunk are settled (delivered, moved or quarantined).
//!
//! ```text
//! count u16 | bits [u8; ceil(count / 8)] (record i = byte i/8, bit i%8) | crc u32
//! ```
//!
//! Written in batches and never fsynced one by one: losing a write costs duplicates, never
//! a loss. For the same reason a bitmap that does not decode is treated by its caller as
//! all zeros (everything delivered again) and reported: [`BitmapError`] says why.

/// The settled records of one chunk of `len` records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleBitmap {
    len: u16,
    bits: Vec<u8>,
    settled: u16,
}

/// Why a stored bitmap cannot be used; the caller treats the chunk as all unsettled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The value's length does not fit the count it claims (or has no count).
    #[error("settle bitmap is {len} bytes, {expected} expected for its count (treated as nothing settled)")]
    Length {
        /// Bytes found.
        len: usize,
        /// Bytes its count calls for (or the minimum).
        expected: usize,
    },
    /// The bitmap's CRC-32 fails.
    #[error("settle bitmap checksum mismatch: stored {stored:#010x}, computed {computed:#010x} (treated as nothing settled)")]
    Checksum {
        /// The checksum stored.
        stored: u32,
        /// The checksum of the bytes as read.
        computed: u32,
    },
    /// A sound bitmap for a different number of records than the chunk holds.
    #[error("settle bitmap covers {found} records, its chunk has {expected} (treated as nothing settled)")]
    Count {
        /// The bitmap's count.
        found: u16,
        /// The chunk header's count.
        expected: u16,
    },
    /// Bits set past the last record: the writer never sets them.
    #[error("settle bitmap has bits set past its {count} records (treated as nothing settled)")]
    Padding {
        /// The bitmap's count.
        count: u16,
    },
}

impl SettleBitmap {
    /// A bitmap for `len` records, none settled.
    pub fn new(len: u16) -> Self {
        SettleBitmap {
            len,
            bits: vec![0; usize::from(len).div_ceil(8)],
            settled: 0,
        }
    }

    /// How many records it covers.
    pub fn len(&self) -> u16 {
        self.len
    }

    /// True for a bitmap of no records.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks record `index` settled. True if it was not before; false if it was, or if
    /// `index` is past the chunk (nothing changes).
    pub fn set(&mut self, index: usize) -> bool {
        if index >= usize::from(self.len) || self.test(index) {
            return false;
        }
        self.bits[index / 8] |= 1 << (index % 8);
        self.settled += 1;
        true
    }

    /// Whether record `index` is settled (false past the chunk).
    pub fn test(&self, index: usize) -> bool {
        index < usize::from(self.len) && self.bits[index / 8] & (1 << (index % 8)) != 0
    }

    /// How many records are settled.
    pub fn count(&self) -> u16 {
        self.settled
    }

    /// True once every record is settled: the chunk can be deleted.
    pub fn all_settled(&self) -> bool {
        self.settled == self.len
    }

    /// The `settled` tree's value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.bits.len() + 4);
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.bits);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a stored bitmap for a chunk of `expected` records (the header's count).
    pub fn decode(raw: &[u8], expected: u16) -> Result<SettleBitmap, BitmapError> {
        let Some(count) = raw.get(..2).map(|c| u16::from_le_bytes([c[0], c[1]])) else {
            return Err(BitmapError::Length {
                len: raw.len(),
                expected: 6,
            });
        };
        let bytes = usize::from(count).div_ceil(8);
        if raw.len() != 2 + bytes + 4 {
            return Err(BitmapError::Length {
                len: raw.len(),
                expected: 2 + bytes + 4,
            });
        }
        let (body, crc) = raw.split_at(2 + bytes);
        let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(BitmapError::Checksum { stored, computed });
        }
        if count != expected {
            return Err(BitmapError::Count {
                found: count,
                expected,
            });
        }
        let bits = body[2..].to_vec();
        let used = usize::from(count % 8);
        if used != 0 && bits.last().is_some_and(|&b| b >> used != 0) {
            return Err(BitmapError::Padding { count });
        }
        let settled = bits.iter().map(|b| b.count_ones() as u16).sum();
        Ok(SettleBitmap {
            len: count,
            bits,
            settled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_test_count_and_all_settled() {
        let mut map = SettleBitmap::new(10);
        assert!(!map.all_settled());
        assert!(map.set(9));
        assert!(!map.set(9), "setting twice reports no change");
        assert!(!map.set(10), "past the chunk changes nothing");
        assert!(map.test(9) && !map.test(8) && !map.test(10));
        for i in 0..10 {
            map.set(i);
        }
        assert_eq!(map.count(), 10);
        assert!(map.all_settled());
    }

    #[test]
    fn padding_bits_are_rejected() {
        let mut raw = SettleBitmap::new(3).encode();
        raw[2] |= 0x80;
        let crc = crc32fast::hash(&raw[..3]);
        raw[3..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            SettleBitmap::decode(&raw, 3),
            Err(BitmapError::Padding { count: 3 })
        );
    }
}
