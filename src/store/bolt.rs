//! A reader of bbolt files, the B+tree database etcd keeps its store in and which
//! `etcdctl snapshot save` writes: enough to walk a bucket's keys in order.
//!
//! bbolt's layout (little endian): the file is pages of the size its meta page gives.
//! Pages 0 and 1 are meta pages; the valid one with the higher transaction id is current
//! and names the root bucket's page. Every page starts with `id u64 · flags u16 · count
//! u16 · overflow u32`, and one with `overflow` n spans n + 1 pages. A branch page holds
//! `count` elements `pos u32 · ksize u32 · child page u64`, a leaf page `flags u32 · pos
//! u32 · ksize u32 · vsize u32`; `pos` is where the key starts, counted from the element
//! itself, and a leaf's value follows its key. A leaf element flagged as a bucket holds
//! `root page u64 · sequence u64`; when the root page is 0 the bucket's one page follows
//! inline.
//!
//! Every offset read from the file is checked: a damaged file is refused, never read past.

use std::fs::File;
use std::os::unix::fs::FileExt;

const PAGE_HEADER: usize = 16;
const BRANCH_PAGE: u16 = 0x01;
const LEAF_PAGE: u16 = 0x02;
const META_PAGE: u16 = 0x04;
const BUCKET_LEAF: u32 = 0x01;
const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const ELEMENT: usize = 16;
const BUCKET_HEADER: usize = 16;
/// The meta fields a checksum covers, then the checksum.
const META_SUMMED: usize = 56;
/// A tree deeper than this is a loop in a damaged file.
const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BoltError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("not a bbolt database (no valid meta page)")]
    NotBolt,
    #[error("the database is damaged: {0}")]
    Damaged(String),
}

fn damaged(what: impl Into<String>) -> BoltError {
    BoltError::Damaged(what.into())
}

/// Whether `head`, the first bytes of a file, is bbolt's first meta page.
pub fn looks_like_bolt(head: &[u8]) -> bool {
    head.len() >= PAGE_HEADER + 4 && u32_at(head, PAGE_HEADER) == Some(MAGIC)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// FNV-1a, 64 bits: what bbolt sums its meta pages with.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

struct Meta {
    page_size: usize,
    root: u64,
    /// Pages in use: every page a tree names is below it.
    pages: u64,
    txid: u64,
}

/// Reads the meta page that starts at `offset`; None when it is not a valid one.
fn read_meta(file: &File, len: u64, offset: u64) -> Result<Option<Meta>, BoltError> {
    let mut b = [0u8; PAGE_HEADER + META_SUMMED + 8];
    if offset + b.len() as u64 > len {
        return Ok(None);
    }
    file.read_exact_at(&mut b, offset)?;
    let m = &b[PAGE_HEADER..];
    let flags = u16_at(&b, 8).unwrap_or(0);
    let ok = flags & META_PAGE != 0
        && u32_at(m, 0) == Some(MAGIC)
        && u32_at(m, 4) == Some(VERSION)
        && u64_at(m, META_SUMMED) == Some(fnv1a64(&m[..META_SUMMED]));
    if !ok {
        return Ok(None);
    }
    let page_size = u32_at(m, 8).unwrap_or(0) as usize;
    if !(512..=1 << 20).contains(&page_size) || !page_size.is_power_of_two() {
        return Ok(None);
    }
    Ok(Some(Meta {
        page_size,
        root: u64_at(m, 16).unwrap_or(0),
        pages: u64_at(m, 40).unwrap_or(0),
        txid: u64_at(m, 48).unwrap_or(0),
    }))
}

/// What a walk calls for each element: its key, its value, and whether it is a bucket.
pub type Visit<'a, E> = dyn FnMut(&[u8], &[u8], bool) -> Result<(), E> + 'a;

/// A bucket: the page its tree starts at, or its one page kept inline in its parent.
pub enum Bucket {
    Paged(u64),
    Inline(Vec<u8>),
}

/// An open bbolt file, read as of its current meta page.
pub struct Bolt {
    file: File,
    len: u64,
    page_size: usize,
    root: u64,
    pages: u64,
}

impl Bolt {
    /// Opens the database held in the first `len` bytes of `file`.
    pub fn open(file: File, len: u64) -> Result<Self, BoltError> {
        let first = read_meta(&file, len, 0)?;
        // The second meta page is one page in; without a valid first one, its size is
        // not known, so each size bbolt may have used is tried.
        let second = match &first {
            Some(m) => read_meta(&file, len, m.page_size as u64)?,
            None => {
                let mut found = None;
                for size in [4096u64, 8192, 16384, 32768, 65536] {
                    if let Some(m) = read_meta(&file, len, size)? {
                        if m.page_size as u64 == size {
                            found = Some(m);
                            break;
                        }
                    }
                }
                found
            }
        };
        let meta = match (first, second) {
            (Some(a), Some(b)) => {
                if b.txid > a.txid {
                    b
                } else {
                    a
                }
            }
            (Some(m), None) | (None, Some(m)) => m,
            (None, None) => return Err(BoltError::NotBolt),
        };
        let bolt = Self { file, len, page_size: meta.page_size, root: meta.root, pages: meta.pages };
        if meta.root < 2 || meta.root >= meta.pages || bolt.pages.saturating_mul(bolt.page_size as u64) > len {
            return Err(damaged(format!(
                "its meta page names root page {} of {} pages in {len} bytes",
                meta.root, meta.pages
            )));
        }
        Ok(bolt)
    }

    /// The page `id` with its overflow pages.
    fn page(&self, id: u64) -> Result<Vec<u8>, BoltError> {
        if id < 2 || id >= self.pages {
            return Err(damaged(format!("a tree names page {id} of {}", self.pages)));
        }
        let offset = id * self.page_size as u64;
        let mut header = [0u8; PAGE_HEADER];
        self.file.read_exact_at(&mut header, offset)?;
        if u64_at(&header, 0) != Some(id) {
            return Err(damaged(format!("page {id} says it is page {}", u64_at(&header, 0).unwrap_or(0))));
        }
        let span = (u64::from(u32_at(&header, 12).unwrap_or(0)) + 1).saturating_mul(self.page_size as u64);
        if offset.saturating_add(span) > self.len || id.saturating_add(span / self.page_size as u64) > self.pages {
            return Err(damaged(format!("page {id} runs past the end of the database")));
        }
        let mut page = vec![0u8; span as usize];
        self.file.read_exact_at(&mut page, offset)?;
        Ok(page)
    }

    /// The root bucket, which holds the named buckets.
    pub fn root(&self) -> Bucket {
        Bucket::Paged(self.root)
    }

    /// The bucket `name` in the root bucket, if there is one.
    pub fn bucket(&self, name: &[u8]) -> Result<Option<Bucket>, BoltError> {
        let mut found = None;
        self.walk::<BoltError>(&self.root(), &mut |k, v, is_bucket| {
            if is_bucket && k == name {
                found = Some(nested(v)?);
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// Calls `f(key, value, is_bucket)` for every element of `bucket`, in key order.
    pub fn walk<E: From<BoltError>>(&self, bucket: &Bucket, f: &mut Visit<'_, E>) -> Result<(), E> {
        match bucket {
            Bucket::Paged(id) => self.walk_page(*id, 0, f),
            Bucket::Inline(page) => self.walk_node(page, 0, f),
        }
    }

    fn walk_page<E: From<BoltError>>(&self, id: u64, depth: usize, f: &mut Visit<'_, E>) -> Result<(), E> {
        if depth > MAX_DEPTH {
            return Err(damaged("its trees loop").into());
        }
        let page = self.page(id)?;
        self.walk_node(&page, depth, f)
    }

    fn walk_node<E: From<BoltError>>(&self, page: &[u8], depth: usize, f: &mut Visit<'_, E>) -> Result<(), E> {
        let flags = u16_at(page, 8).ok_or_else(|| damaged("a page shorter than its header"))?;
        let count = usize::from(u16_at(page, 10).unwrap_or(0));
        if PAGE_HEADER + count * ELEMENT > page.len() {
            return Err(damaged("a page's elements run past its end").into());
        }
        for i in 0..count {
            let at = PAGE_HEADER + i * ELEMENT;
            let field = |n: usize| u32_at(page, at + 4 * n).unwrap_or(0) as usize;
            if flags & BRANCH_PAGE != 0 {
                let child = u64_at(page, at + 8).unwrap_or(0);
                self.walk_page(child, depth + 1, f)?;
            } else if flags & LEAF_PAGE != 0 {
                let (elem_flags, pos, ksize, vsize) = (field(0) as u32, field(1), field(2), field(3));
                let key_at = at.saturating_add(pos);
                let end = key_at.saturating_add(ksize).saturating_add(vsize);
                if end > page.len() {
                    return Err(damaged("a leaf's key or value runs past its page").into());
                }
                let (k, v) = page[key_at..end].split_at(ksize);
                f(k, v, elem_flags & BUCKET_LEAF != 0)?;
            } else {
                return Err(damaged(format!("a tree holds a page of kind {flags:#x}")).into());
            }
        }
        Ok(())
    }
}

/// The bucket a bucket element's value describes.
fn nested(value: &[u8]) -> Result<Bucket, BoltError> {
    let root = u64_at(value, 0).ok_or_else(|| damaged("a bucket's header is cut short"))?;
    if value.len() < BUCKET_HEADER {
        return Err(damaged("a bucket's header is cut short"));
    }
    Ok(if root == 0 { Bucket::Inline(value[BUCKET_HEADER..].to_vec()) } else { Bucket::Paged(root) })
}

/// Builds bbolt files for tests, page by page.
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    pub const PAGE: usize = 4096;

    fn header(page: &mut [u8], id: u64, flags: u16, count: u16, overflow: u32) {
        page[0..8].copy_from_slice(&id.to_le_bytes());
        page[8..10].copy_from_slice(&flags.to_le_bytes());
        page[10..12].copy_from_slice(&count.to_le_bytes());
        page[12..16].copy_from_slice(&overflow.to_le_bytes());
    }

    pub fn meta(id: u64, root: u64, pages: u64, txid: u64) -> Vec<u8> {
        let mut p = vec![0u8; PAGE];
        header(&mut p, id, META_PAGE, 0, 0);
        let m = &mut p[PAGE_HEADER..];
        m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        m[4..8].copy_from_slice(&VERSION.to_le_bytes());
        m[8..12].copy_from_slice(&(PAGE as u32).to_le_bytes());
        m[16..24].copy_from_slice(&root.to_le_bytes());
        m[40..48].copy_from_slice(&pages.to_le_bytes());
        m[48..56].copy_from_slice(&txid.to_le_bytes());
        let sum = fnv1a64(&m[..META_SUMMED]);
        m[META_SUMMED..META_SUMMED + 8].copy_from_slice(&sum.to_le_bytes());
        p
    }

    /// A leaf page of (key, value, is_bucket) elements, as many pages long as it needs;
    /// `id` 0 for an inline one, cut to its contents.
    pub fn leaf(id: u64, items: &[(&[u8], &[u8], bool)]) -> Vec<u8> {
        let size = PAGE_HEADER + items.iter().map(|(k, v, _)| ELEMENT + k.len() + v.len()).sum::<usize>();
        let pages = size.div_ceil(PAGE).max(1);
        let mut p = vec![0u8; PAGE * pages];
        header(&mut p, id, LEAF_PAGE, items.len() as u16, pages as u32 - 1);
        let mut data = PAGE_HEADER + items.len() * ELEMENT;
        for (i, (k, v, b)) in items.iter().enumerate() {
            let at = PAGE_HEADER + i * ELEMENT;
            let fields = [u32::from(*b), (data - at) as u32, k.len() as u32, v.len() as u32];
            for (n, x) in fields.iter().enumerate() {
                p[at + 4 * n..at + 4 * n + 4].copy_from_slice(&x.to_le_bytes());
            }
            p[data..data + k.len()].copy_from_slice(k);
            p[data + k.len()..data + k.len() + v.len()].copy_from_slice(v);
            data += k.len() + v.len();
        }
        if id == 0 {
            p.truncate(data);
        }
        p
    }

    pub fn branch(id: u64, children: &[(&[u8], u64)]) -> Vec<u8> {
        let mut p = vec![0u8; PAGE];
        header(&mut p, id, BRANCH_PAGE, children.len() as u16, 0);
        let mut data = PAGE_HEADER + children.len() * ELEMENT;
        for (i, (k, child)) in children.iter().enumerate() {
            let at = PAGE_HEADER + i * ELEMENT;
            p[at..at + 4].copy_from_slice(&((data - at) as u32).to_le_bytes());
            p[at + 4..at + 8].copy_from_slice(&(k.len() as u32).to_le_bytes());
            p[at + 8..at + 16].copy_from_slice(&child.to_le_bytes());
            p[data..data + k.len()].copy_from_slice(k);
            data += k.len();
        }
        p
    }

    pub fn bucket_value(root: u64, inline: &[u8]) -> Vec<u8> {
        [&root.to_le_bytes()[..], &[0u8; 8], inline].concat()
    }

    /// A database of named buckets, each one leaf page (with overflow pages as needed)
    /// of (key, value) items in key order.
    pub type Items = Vec<(Vec<u8>, Vec<u8>)>;

    pub fn database(buckets: &[(&[u8], Items)]) -> Vec<u8> {
        let mut pages = Vec::new();
        let mut next = 3u64;
        let mut root = Vec::new();
        for (name, items) in buckets {
            let items: Vec<(&[u8], &[u8], bool)> = items.iter().map(|(k, v)| (&k[..], &v[..], false)).collect();
            let page = leaf(next, &items);
            root.push((name.to_vec(), bucket_value(next, &[])));
            next += (page.len() / PAGE) as u64;
            pages.push(page);
        }
        let root: Vec<(&[u8], &[u8], bool)> = root.iter().map(|(k, v)| (&k[..], &v[..], true)).collect();
        [vec![meta(0, 2, next, 1), meta(1, 2, next, 1), leaf(2, &root)], pages].concat().concat()
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use std::io::Write;

    /// Root (page 4) holds bucket "big", a tree of a branch (page 5) over two leaves (6,
    /// and 7 with an overflow page), and the inline bucket "small". Meta page 1 is the
    /// newer one.
    fn database() -> Vec<u8> {
        let big_value = vec![7u8; 6000];
        let small = leaf(0, &[(b"s", b"tiny", false)]);
        let pages = [
            meta(0, 3, 9, 1),
            meta(1, 4, 9, 2),
            leaf(2, &[]),
            leaf(3, &[]),
            leaf(4, &[(b"big", &bucket_value(5, &[]), true), (b"small", &bucket_value(0, &small), true)]),
            branch(5, &[(b"a", 6), (b"m", 7)]),
            leaf(6, &[(b"a", b"1", false), (b"b", b"2", false)]),
            leaf(7, &[(b"m", &big_value, false), (b"z", b"3", false)]),
        ];
        pages.concat()
    }
    fn open(bytes: &[u8]) -> Result<Bolt, BoltError> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        Bolt::open(f, bytes.len() as u64)
    }

    fn items(db: &Bolt, name: &[u8]) -> Result<Vec<(Vec<u8>, usize)>, BoltError> {
        let b = db.bucket(name)?.expect("the bucket");
        let mut out = Vec::new();
        db.walk::<BoltError>(&b, &mut |k, v, _| {
            out.push((k.to_vec(), v.len()));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn buckets_are_walked_in_key_order_through_branches_overflow_and_inline_pages() {
        let bytes = database();
        assert!(looks_like_bolt(&bytes));
        let db = open(&bytes).unwrap();
        let big = items(&db, b"big").unwrap();
        let keys: Vec<_> = big.iter().map(|(k, n)| (String::from_utf8(k.clone()).unwrap(), *n)).collect();
        assert_eq!(keys, [("a".into(), 1), ("b".into(), 1), ("m".into(), 6000), ("z".into(), 1)]);
        assert_eq!(items(&db, b"small").unwrap(), [(b"s".to_vec(), 4)]);
        assert!(db.bucket(b"none").unwrap().is_none());
    }

    #[test]
    fn the_newer_valid_meta_page_is_used() {
        let mut bytes = database();
        // Meta page 1 (txid 2, root 4) spoiled: page 0 (txid 1) names root 3, an empty leaf.
        bytes[PAGE + PAGE_HEADER + 20] ^= 1;
        let db = open(&bytes).unwrap();
        assert!(db.bucket(b"big").unwrap().is_none());
        // Both spoiled: not a database.
        bytes[PAGE_HEADER + 20] ^= 1;
        assert!(matches!(open(&bytes), Err(BoltError::NotBolt)));
        assert!(!looks_like_bolt(b"meshkv-backup 1\n"));
    }

    #[test]
    fn damage_is_refused_without_a_panic() {
        let good = database();
        // Any byte of a tree page changed, to each of a few values: an error or a walk,
        // never a panic or a read past the file.
        for at in (2 * PAGE..good.len()).step_by(7) {
            for x in [0u8, 1, 0x7f, 0xff] {
                let mut bytes = good.clone();
                bytes[at] = x;
                if let Ok(db) = open(&bytes) {
                    for name in [&b"big"[..], b"small"] {
                        if let Ok(Some(b)) = db.bucket(name) {
                            let _ = db.walk::<BoltError>(&b, &mut |_, _, _| Ok(()));
                        }
                    }
                }
            }
        }
        // A child that points back up is a loop, refused.
        let mut bytes = good.clone();
        let child = 5 * PAGE + PAGE_HEADER + 8;
        bytes[child..child + 8].copy_from_slice(&5u64.to_le_bytes());
        let db = open(&bytes).unwrap();
        let b = db.bucket(b"big").unwrap().unwrap();
        let walked = db.walk::<BoltError>(&b, &mut |_, _, _| Ok(()));
        assert!(matches!(walked, Err(BoltError::Damaged(ref w)) if w.contains("loop")), "{:?}", walked.err());
        // Cut short: the pages the meta page counts are not all there.
        assert!(matches!(open(&good[..6 * PAGE]), Err(BoltError::Damaged(_))));
    }
}
