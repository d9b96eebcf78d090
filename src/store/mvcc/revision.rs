//! Revisions: (main, sub). `main` counts store-changing requests (a Txn is one);
//! `sub` orders the changes inside one of them.

/// A point in the store's history.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

/// Length of a revision key in the `kv` column family, without the tombstone mark.
pub const REV_KEY_LEN: usize = 16;
const TOMBSTONE_MARK: u8 = b't';

impl Revision {
    pub const fn new(main: i64, sub: i64) -> Self {
        Self { main, sub }
    }

    /// The `kv` column family key: big-endian main and sub, so keys sort by revision,
    /// followed by `t` when the revision deleted its key.
    pub fn to_key(self, tombstone: bool) -> Vec<u8> {
        let mut k = Vec::with_capacity(REV_KEY_LEN + 1);
        k.extend_from_slice(&self.main.to_be_bytes());
        k.extend_from_slice(&self.sub.to_be_bytes());
        if tombstone {
            k.push(TOMBSTONE_MARK);
        }
        k
    }

    /// Parses a `kv` key into the revision and whether it is a tombstone.
    pub fn from_key(k: &[u8]) -> Option<(Self, bool)> {
        let tombstone = match k.len() {
            REV_KEY_LEN => false,
            n if n == REV_KEY_LEN + 1 && k[REV_KEY_LEN] == TOMBSTONE_MARK => true,
            _ => return None,
        };
        let main = i64::from_be_bytes(k[0..8].try_into().ok()?);
        let sub = i64::from_be_bytes(k[8..16].try_into().ok()?);
        Some((Self { main, sub }, tombstone))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_revision() {
        let a = Revision::new(5, 2);
        assert_eq!(Revision::from_key(&a.to_key(false)), Some((a, false)));
        assert_eq!(Revision::from_key(&a.to_key(true)), Some((a, true)));
        assert!(Revision::new(5, 9).to_key(false) < Revision::new(6, 0).to_key(false));
        assert!(Revision::new(256, 0).to_key(false) > Revision::new(255, 7).to_key(true));
        assert_eq!(Revision::from_key(b"short"), None);
    }
}
