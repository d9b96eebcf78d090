//! bbolt files, the B+tree database etcd keeps its store in and which `etcdctl snapshot
//! save` writes: a reader that walks a bucket's keys in order, and a writer that lays
//! buckets out page by page, as a stream.
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
use std::io::Write;
use std::os::unix::fs::FileExt;

const PAGE_HEADER: usize = 16;
const BRANCH_PAGE: u16 = 0x01;
const LEAF_PAGE: u16 = 0x02;
const META_PAGE: u16 = 0x04;
const FREELIST_PAGE: u16 = 0x10;
/// The page size of the files written here (bbolt's on most machines).
pub const PAGE_SIZE: usize = 4096;
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

fn put_header(page: &mut [u8], id: u64, flags: u16, count: usize, overflow: usize) {
    page[0..8].copy_from_slice(&id.to_le_bytes());
    page[8..10].copy_from_slice(&flags.to_le_bytes());
    page[10..12].copy_from_slice(&(count as u16).to_le_bytes());
    page[12..16].copy_from_slice(&(overflow as u32).to_le_bytes());
}

/// A page of `size` bytes of contents, in whole pages.
fn blank_page(id: u64, flags: u16, count: usize, size: usize) -> Vec<u8> {
    let pages = size.div_ceil(PAGE_SIZE).max(1);
    let mut p = vec![0u8; pages * PAGE_SIZE];
    put_header(&mut p, id, flags, count, pages - 1);
    p
}

fn meta_page(id: u64, layout: &Layout) -> Vec<u8> {
    let mut p = blank_page(id, META_PAGE, 0, PAGE_HEADER);
    let m = &mut p[PAGE_HEADER..];
    m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    m[4..8].copy_from_slice(&VERSION.to_le_bytes());
    m[8..12].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    m[16..24].copy_from_slice(&layout.root.to_le_bytes());
    m[32..40].copy_from_slice(&layout.freelist.to_le_bytes());
    m[40..48].copy_from_slice(&layout.pages.to_le_bytes());
    m[48..56].copy_from_slice(&(id + 1).to_le_bytes());
    let sum = fnv1a64(&m[..META_SUMMED]);
    m[META_SUMMED..META_SUMMED + 8].copy_from_slice(&sum.to_le_bytes());
    p
}

/// A leaf page of (key, value, is_bucket) elements, spanning as many pages as they need.
fn leaf_page(id: u64, items: &[(&[u8], &[u8], bool)]) -> Vec<u8> {
    let size = PAGE_HEADER + items.iter().map(|(k, v, _)| ELEMENT + k.len() + v.len()).sum::<usize>();
    let mut p = blank_page(id, LEAF_PAGE, items.len(), size);
    let mut data = PAGE_HEADER + items.len() * ELEMENT;
    for (i, (k, v, bucket)) in items.iter().enumerate() {
        let at = PAGE_HEADER + i * ELEMENT;
        let fields = [u32::from(*bucket), (data - at) as u32, k.len() as u32, v.len() as u32];
        for (n, x) in fields.iter().enumerate() {
            p[at + 4 * n..at + 4 * n + 4].copy_from_slice(&x.to_le_bytes());
        }
        p[data..data + k.len()].copy_from_slice(k);
        p[data + k.len()..data + k.len() + v.len()].copy_from_slice(v);
        data += k.len() + v.len();
    }
    p
}

/// A branch page over (first key, page) children.
fn branch_page(id: u64, children: &[(Vec<u8>, u64)]) -> Vec<u8> {
    let size = PAGE_HEADER + children.iter().map(|(k, _)| ELEMENT + k.len()).sum::<usize>();
    let mut p = blank_page(id, BRANCH_PAGE, children.len(), size);
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

fn bucket_value(root: u64) -> [u8; BUCKET_HEADER] {
    let mut v = [0u8; BUCKET_HEADER];
    v[..8].copy_from_slice(&root.to_le_bytes());
    v
}

/// Where a written file's meta pages point: what they must say before the rest is
/// written.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Layout {
    root: u64,
    freelist: u64,
    pages: u64,
}

impl Layout {
    /// The length of the file.
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE as u64
    }
}

/// Writes a bbolt file to a stream: named buckets, each filled in key order, leaves
/// packed full, branch pages built above them once a bucket ends, then the root bucket
/// and an empty freelist. The meta pages come first but name pages written last, so a
/// file is written twice: once to learn its [`Layout`] (to `io::sink()`), then for real
/// with it. The same puts give the same layout.
pub struct BoltWriter<W: Write> {
    out: W,
    next: u64,
    /// Each bucket ended so far and its root page.
    roots: Vec<(Vec<u8>, u64)>,
    /// The open bucket's leaf being filled, and its size.
    leaf: Vec<(Vec<u8>, Vec<u8>)>,
    leaf_bytes: usize,
    /// The open bucket's leaves written so far: first key and page.
    leaves: Vec<(Vec<u8>, u64)>,
    open: Option<Vec<u8>>,
}

impl<W: Write> BoltWriter<W> {
    /// Starts a file; `layout` from an earlier run of the same puts, or None for that run.
    pub fn new(mut out: W, layout: Option<Layout>) -> std::io::Result<Self> {
        let layout = layout.unwrap_or_default();
        out.write_all(&meta_page(0, &layout))?;
        out.write_all(&meta_page(1, &layout))?;
        Ok(Self { out, next: 2, roots: Vec::new(), leaf: Vec::new(), leaf_bytes: 0, leaves: Vec::new(), open: None })
    }

    fn page(&mut self, page: Vec<u8>) -> std::io::Result<u64> {
        let id = self.next;
        self.next += (page.len() / PAGE_SIZE) as u64;
        self.out.write_all(&page)?;
        Ok(id)
    }

    /// Opens bucket `name`, ending the one open before.
    pub fn begin(&mut self, name: &[u8]) -> std::io::Result<()> {
        self.end()?;
        self.open = Some(name.to_vec());
        Ok(())
    }

    /// Adds an element to the open bucket; keys must come in order.
    pub fn put(&mut self, k: &[u8], v: &[u8]) -> std::io::Result<()> {
        let size = ELEMENT + k.len() + v.len();
        if !self.leaf.is_empty() && PAGE_HEADER + self.leaf_bytes + size > PAGE_SIZE {
            self.write_leaf()?;
        }
        self.leaf.push((k.to_vec(), v.to_vec()));
        self.leaf_bytes += size;
        Ok(())
    }

    fn write_leaf(&mut self) -> std::io::Result<()> {
        let items: Vec<(&[u8], &[u8], bool)> = self.leaf.iter().map(|(k, v)| (&k[..], &v[..], false)).collect();
        let first = self.leaf.first().map(|(k, _)| k.clone()).unwrap_or_default();
        let page = leaf_page(self.next, &items);
        let id = self.page(page)?;
        self.leaves.push((first, id));
        self.leaf.clear();
        self.leaf_bytes = 0;
        Ok(())
    }

    /// Ends the open bucket: its last leaf, then the branch pages over its leaves.
    fn end(&mut self) -> std::io::Result<()> {
        let Some(name) = self.open.take() else { return Ok(()) };
        if !self.leaf.is_empty() || self.leaves.is_empty() {
            self.write_leaf()?;
        }
        let mut level = std::mem::take(&mut self.leaves);
        while level.len() > 1 {
            let mut above = Vec::new();
            let mut start = 0;
            while start < level.len() {
                let mut end = start;
                let mut size = PAGE_HEADER;
                while end < level.len() && (end == start || size + ELEMENT + level[end].0.len() <= PAGE_SIZE) {
                    size += ELEMENT + level[end].0.len();
                    end += 1;
                }
                let page = branch_page(self.next, &level[start..end]);
                let first = level[start].0.clone();
                above.push((first, self.page(page)?));
                start = end;
            }
            level = above;
        }
        self.roots.push((name, level[0].1));
        Ok(())
    }

    /// Ends the file: the root bucket and the freelist. Returns its layout; flushing the
    /// stream is left to its owner.
    pub fn finish(mut self) -> std::io::Result<Layout> {
        self.end()?;
        let mut roots = std::mem::take(&mut self.roots);
        roots.sort();
        let values: Vec<_> = roots.iter().map(|(_, root)| bucket_value(*root)).collect();
        let items: Vec<(&[u8], &[u8], bool)> =
            roots.iter().zip(&values).map(|((name, _), v)| (&name[..], &v[..], true)).collect();
        let root = self.page(leaf_page(self.next, &items))?;
        let freelist = self.page(blank_page(self.next, FREELIST_PAGE, 0, PAGE_HEADER))?;
        Ok(Layout { root, freelist, pages: self.next })
    }
}

/// Builds bbolt files for tests, page by page.
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    pub const PAGE: usize = PAGE_SIZE;

    pub fn meta(id: u64, root: u64, pages: u64, txid: u64) -> Vec<u8> {
        let mut p = meta_page(id, &Layout { root, freelist: 0, pages });
        let m = &mut p[PAGE_HEADER..];
        m[48..56].copy_from_slice(&txid.to_le_bytes());
        let sum = fnv1a64(&m[..META_SUMMED]);
        m[META_SUMMED..META_SUMMED + 8].copy_from_slice(&sum.to_le_bytes());
        p
    }

    /// As [`leaf_page`]; `id` 0 for an inline one, cut to its contents.
    pub fn leaf(id: u64, items: &[(&[u8], &[u8], bool)]) -> Vec<u8> {
        let mut p = leaf_page(id, items);
        if id == 0 {
            let size = PAGE_HEADER + items.iter().map(|(k, v, _)| ELEMENT + k.len() + v.len()).sum::<usize>();
            p.truncate(size);
        }
        p
    }

    pub fn branch(id: u64, children: &[(&[u8], u64)]) -> Vec<u8> {
        let children: Vec<_> = children.iter().map(|(k, c)| (k.to_vec(), *c)).collect();
        branch_page(id, &children)
    }

    pub fn bucket_with(root: u64, inline: &[u8]) -> Vec<u8> {
        [&super::bucket_value(root)[..], inline].concat()
    }

    pub type Items = Vec<(Vec<u8>, Vec<u8>)>;

    /// A database of named buckets of (key, value) items in key order.
    pub fn database(buckets: &[(&[u8], Items)]) -> Vec<u8> {
        let fill = |out: &mut dyn Write, layout| {
            let mut w = BoltWriter::new(out, layout).unwrap();
            for (name, items) in buckets {
                w.begin(name).unwrap();
                for (k, v) in items {
                    w.put(k, v).unwrap();
                }
            }
            w.finish().unwrap()
        };
        let layout = fill(&mut std::io::sink(), None);
        let mut bytes = Vec::new();
        assert_eq!(fill(&mut bytes, Some(layout)), layout, "the same puts, the same layout");
        bytes
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
    fn handmade() -> Vec<u8> {
        let big_value = vec![7u8; 6000];
        let small = leaf(0, &[(b"s", b"tiny", false)]);
        let pages = [
            meta(0, 3, 9, 1),
            meta(1, 4, 9, 2),
            leaf(2, &[]),
            leaf(3, &[]),
            leaf(4, &[(b"big", &bucket_with(5, &[]), true), (b"small", &bucket_with(0, &small), true)]),
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

    fn items_of(db: &Bolt, name: &[u8]) -> Result<Vec<(Vec<u8>, usize)>, BoltError> {
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
        let bytes = handmade();
        assert!(looks_like_bolt(&bytes));
        let db = open(&bytes).unwrap();
        let big = items_of(&db, b"big").unwrap();
        let keys: Vec<_> = big.iter().map(|(k, n)| (String::from_utf8(k.clone()).unwrap(), *n)).collect();
        assert_eq!(keys, [("a".into(), 1), ("b".into(), 1), ("m".into(), 6000), ("z".into(), 1)]);
        assert_eq!(items_of(&db, b"small").unwrap(), [(b"s".to_vec(), 4)]);
        assert!(db.bucket(b"none").unwrap().is_none());
    }

    #[test]
    fn what_the_writer_lays_out_the_reader_walks_back() {
        // Enough for two levels of branches, values from none to several pages, and
        // an empty bucket.
        let items: Items = (0..20_000u32)
            .map(|i| {
                let len = if i % 5000 == 1 { 3 * PAGE + 17 } else { (i % 97) as usize };
                (format!("key/{i:08}").into_bytes(), vec![i as u8; len])
            })
            .collect();
        let few: Items = vec![(b"x".to_vec(), b"1".to_vec())];
        let buckets: [(&[u8], Items); 3] = [(b"many", items.clone()), (b"empty", Vec::new()), (b"few", few)];
        let bytes = database(&buckets);
        assert_eq!(bytes.len() % PAGE, 0);
        let mut layout = BoltWriter::new(std::io::sink(), None).unwrap();
        for (name, items) in &buckets {
            layout.begin(name).unwrap();
            for (k, v) in items {
                layout.put(k, v).unwrap();
            }
        }
        assert_eq!(layout.finish().unwrap().bytes(), bytes.len() as u64, "the layout knows the length");
        let db = open(&bytes).unwrap();
        let mut back = Vec::new();
        db.walk::<BoltError>(&db.bucket(b"many").unwrap().unwrap(), &mut |k, v, bucket| {
            assert!(!bucket);
            back.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        assert!(back == items, "{} items back of {}", back.len(), items.len());
        assert_eq!(items_of(&db, b"empty").unwrap(), []);
        assert_eq!(items_of(&db, b"few").unwrap(), [(b"x".to_vec(), 1)]);
        let mut names = Vec::new();
        db.walk::<BoltError>(&db.root(), &mut |k, _, bucket| {
            names.push((k.to_vec(), bucket));
            Ok(())
        })
        .unwrap();
        let sorted = [(b"empty".to_vec(), true), (b"few".to_vec(), true), (b"many".to_vec(), true)];
        assert_eq!(names, sorted, "the root bucket in name order");
    }

    #[test]
    fn the_newer_valid_meta_page_is_used() {
        let mut bytes = handmade();
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
        let good = handmade();
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
