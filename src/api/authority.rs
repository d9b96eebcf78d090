//! Client connections that take the `:authority` etcd's own clients send.
//!
//! Some etcd clients send requests whose `:authority` is no authority at all: etcdctl 3.4
//! sends the endpoint's URL (`http://127.0.0.1:2379`) on its calls to one endpoint
//! (`endpoint status`, `endpoint hashkv`, `defrag`), and clientv3 3.5.0 to 3.5.9 sends
//! `#initially=[https://host:2379]` on every call. etcd's server takes them; h2 refuses
//! such a request with PROTOCOL_ERROR before any service sees it. Nothing here uses the
//! authority, so a server connection's reads pass through [`LenientAuthority`], which
//! finds each `:authority` a client sends as a literal in a HEADERS frame and, when its
//! value is not a valid authority, puts one of the same length in its place before h2
//! reads the frame:
//!
//! - the same decoded length, so that the header tables of both ends keep the same
//!   sizes, and later requests that refer to the entry by index find the mended value;
//! - the same encoded length (a Huffman-coded value is replaced by a Huffman code of
//!   as many bytes), so that the frame is mended in place.
//!
//! Frames are found as the bytes pass; a HEADERS frame that a read ends in the middle of
//! is held back until it is whole. Everything else passes untouched.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// What every HTTP/2 client sends first, before its frames.
const PREFACE_BYTES: usize = 24;
const FRAME_HEADER_BYTES: usize = 9;
const HEADERS: u8 = 0x1;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest HEADERS frame held back to be mended whole; a larger one (past the frame
/// size a server allows by default) passes as it is.
const MAX_HELD_FRAME: usize = 16 << 10;
/// `:authority`'s index in HPACK's static table.
const AUTHORITY_INDEX: usize = 1;

/// A connection whose HEADERS frames are mended, as they are read, to carry valid
/// authorities.
pub struct LenientAuthority<T> {
    inner: T,
    /// Stream bytes to pass before the next frame header.
    skip: usize,
    /// Bytes read and not yet handed on: from the start of a frame not yet whole.
    held: Vec<u8>,
    /// How many bytes at the front of `held` are ready to hand on.
    ready: usize,
    /// The last `:authority` found valid, as encoded: a client sends the same one on
    /// every request, and it is checked once.
    valid: Valid,
}

impl<T> LenientAuthority<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, skip: PREFACE_BYTES, held: Vec::new(), ready: 0, valid: Valid::default() }
    }

    /// Passes over `bytes`, the stream's next, mending each HEADERS frame whole in them.
    /// Returns where a frame starts that they hold only part of and that must be held
    /// back; scanning then resumes at that frame.
    fn scan(&mut self, bytes: &mut [u8]) -> Option<usize> {
        let mut at = 0;
        loop {
            let n = self.skip.min(bytes.len() - at);
            self.skip -= n;
            at += n;
            if at == bytes.len() {
                return None;
            }
            let Some(head) = bytes.get(at..at + FRAME_HEADER_BYTES) else { return Some(at) };
            let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
            let (kind, flags) = (head[3], head[4]);
            if kind != HEADERS || len > MAX_HELD_FRAME {
                self.skip = FRAME_HEADER_BYTES + len;
                continue;
            }
            let end = at + FRAME_HEADER_BYTES + len;
            let Some(payload) = bytes.get_mut(at + FRAME_HEADER_BYTES..end) else { return Some(at) };
            mend_headers(flags, payload, &mut self.valid);
            at = end;
        }
    }
}

/// Mends the `:authority` literals of one HEADERS frame's payload.
fn mend_headers(flags: u8, payload: &mut [u8], valid: &mut Valid) {
    let mut start = 0;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let Some(&pad) = payload.first() else { return };
        start = 1;
        let Some(e) = end.checked_sub(pad as usize) else { return };
        end = e;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    if let Some(block) = payload.get_mut(start..end) {
        mend_block(block, valid);
    }
}

/// Mends the `:authority` literals of a header block (or of its first fragment: a field
/// cut off at its end is left alone).
fn mend_block(block: &mut [u8], valid: &mut Valid) {
    let mut at = 0;
    while at < block.len() {
        let b = block[at];
        let step = if b & 0x80 != 0 {
            integer(block, at, 7).map(|(_, next)| next)
        } else if b & 0xc0 == 0x40 {
            literal(block, at, 6, valid)
        } else if b & 0xe0 == 0x20 {
            integer(block, at, 5).map(|(_, next)| next)
        } else {
            literal(block, at, 4, valid)
        };
        match step {
            Some(next) => at = next,
            None => return,
        }
    }
}

/// An HPACK integer with an `prefix`-bit prefix at `at`: its value and where it ends.
fn integer(block: &[u8], at: usize, prefix: u8) -> Option<(usize, usize)> {
    let mask = (1usize << prefix) - 1;
    let mut value = (*block.get(at)? as usize) & mask;
    let mut at = at + 1;
    if value < mask {
        return Some((value, at));
    }
    let mut shift = 0;
    loop {
        let b = *block.get(at)?;
        at += 1;
        value = value.checked_add(((b & 0x7f) as usize).checked_shl(shift)?)?;
        if b & 0x80 == 0 {
            return Some((value, at));
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// A string literal at `at`: whether it is Huffman-coded, its bytes' range, its end.
fn string(block: &[u8], at: usize) -> Option<(bool, std::ops::Range<usize>)> {
    let huffman = *block.get(at)? & 0x80 != 0;
    let (len, start) = integer(block, at, 7)?;
    let end = start.checked_add(len)?;
    (end <= block.len()).then_some((huffman, start..end))
}

/// A literal field at `at` whose name index has a `prefix`-bit prefix; mends its value
/// if it is an `:authority`. Returns where the field ends.
fn literal(block: &mut [u8], at: usize, prefix: u8, valid: &mut Valid) -> Option<usize> {
    let (name_index, mut at) = integer(block, at, prefix)?;
    let authority = if name_index == 0 {
        let (huffman, name) = string(block, at)?;
        at = name.end;
        decoded(&block[name], huffman).is_some_and(|n| n == b":authority")
    } else {
        name_index == AUTHORITY_INDEX
    };
    let (huffman, value) = string(block, at)?;
    let end = value.end;
    if authority {
        mend_value(&mut block[value], huffman, valid);
    }
    Some(end)
}

fn decoded(bytes: &[u8], huffman: bool) -> Option<Vec<u8>> {
    if huffman {
        fluke_hpack::huffman::HuffmanDecoder::new().decode(bytes).ok()
    } else {
        Some(bytes.to_vec())
    }
}

fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// The encoding of the last `:authority` found valid.
#[derive(Default)]
struct Valid {
    huffman: bool,
    encoded: Vec<u8>,
}

/// Replaces an authority that is not one with one as long, decoded and encoded.
fn mend_value(value: &mut [u8], huffman: bool, valid: &mut Valid) {
    if valid.huffman == huffman && valid.encoded == *value {
        return;
    }
    let Some(text) = decoded(value, huffman) else { return };
    if valid_authority(&text) {
        valid.huffman = huffman;
        valid.encoded.clear();
        valid.encoded.extend_from_slice(value);
        return;
    }
    if !huffman {
        value.fill(b'x');
        return;
    }
    if let Some(code) = huffman_of_length(text.len(), value.len()) {
        value.copy_from_slice(&code);
    }
}

/// Characters valid in an authority, one for each of these Huffman code lengths above
/// the shortest (5 bits, `a`): (extra bits, character, code).
const LONGER: [(usize, u8, u32); 6] =
    [(8, b'~', 0x1ffd), (6, b'+', 0x7fb), (5, b'!', 0x3f8), (3, b'X', 0xfc), (2, b'x', 0x79), (1, b'b', 0x23)];
const SHORTEST: (u8, u32, usize) = (b'a', 0x3, 5);

/// Whether `extra` bits can be spread over `chars` characters, each taking 0 or one of
/// `LONGER`'s extras (1, 2, 3, 5, 6 or 8).
fn spreadable(extra: usize, chars: usize) -> bool {
    match chars {
        0 => extra == 0,
        1 => matches!(extra, 0 | 1 | 2 | 3 | 5 | 6 | 8),
        _ => extra <= 8 * chars && extra != 8 * chars - 1,
    }
}

/// A Huffman code of `bytes` bytes for `chars` characters valid in an authority, if
/// there is one.
fn huffman_of_length(chars: usize, bytes: usize) -> Option<Vec<u8>> {
    let base = SHORTEST.2 * chars;
    // The last byte may end in up to 7 bits of padding.
    let bits =
        (0..8).filter_map(|pad| (8 * bytes).checked_sub(pad)).find(|&b| b >= base && spreadable(b - base, chars))?;
    let mut extra = bits - base;
    let codes = (0..chars).rev().map(|left| {
        match LONGER.iter().find(|&&(more, _, _)| more <= extra && spreadable(extra - more, left)) {
            Some(&(more, _, code)) => {
                extra -= more;
                (code, (SHORTEST.2 + more) as u32)
            }
            None => (SHORTEST.1, SHORTEST.2 as u32),
        }
    });
    let out = pack(codes);
    (out.len() == bytes).then_some(out)
}

/// Huffman codes, (code, length in bits), packed into bytes; the last byte is padded
/// with the most significant bits of the end-of-string code, all ones.
fn pack(codes: impl IntoIterator<Item = (u32, u32)>) -> Vec<u8> {
    let (mut acc, mut n, mut out) = (0u64, 0u32, Vec::new());
    for (code, len) in codes {
        acc = acc << len | code as u64;
        n += len;
        while n >= 8 {
            n -= 8;
            out.push((acc >> n) as u8);
        }
    }
    if n > 0 {
        out.push(((acc << (8 - n)) | ((1 << (8 - n)) - 1)) as u8);
    }
    out
}

impl<T: AsyncRead + Unpin> AsyncRead for LenientAuthority<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            if me.ready > 0 {
                let n = me.ready.min(buf.remaining());
                buf.put_slice(&me.held[..n]);
                me.held.drain(..n);
                me.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if me.held.is_empty() {
                // Straight into the caller's buffer, mended there.
                let before = buf.filled().len();
                ready!(Pin::new(&mut me.inner).poll_read(cx, buf))?;
                let read = buf.filled().len() - before;
                if read == 0 {
                    return Poll::Ready(Ok(()));
                }
                let Some(cut) = me.scan(&mut buf.filled_mut()[before..]) else { return Poll::Ready(Ok(())) };
                me.held.extend_from_slice(&buf.filled()[before + cut..]);
                buf.set_filled(before + cut);
                if cut > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // A frame is held back: read the rest of it.
            let mut more = [0u8; 8192];
            let mut more = ReadBuf::new(&mut more);
            ready!(Pin::new(&mut me.inner).poll_read(cx, &mut more))?;
            if more.filled().is_empty() {
                // The end: what is held goes on as it is.
                me.ready = me.held.len();
                continue;
            }
            me.held.extend_from_slice(more.filled());
            let mut held = std::mem::take(&mut me.held);
            me.ready = me.scan(&mut held).unwrap_or(held.len());
            me.held = held;
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for LenientAuthority<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for LenientAuthority<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use fluke_hpack::huffman::HuffmanDecoder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A Huffman code for `text` from a few characters' codes (RFC 7541, appendix B).
    fn huffman(text: &str) -> Vec<u8> {
        let codes = [(b'a', 0x3u32, 5u32), (b'b', 0x23, 6), (b'x', 0x79, 7), (b'/', 0x18, 6), (b'#', 0xffa, 12)];
        let out = pack(text.bytes().map(|c| {
            let &(_, code, len) = codes.iter().find(|k| k.0 == c).expect("a character with a known code");
            (code, len)
        }));
        assert_eq!(HuffmanDecoder::new().decode(&out).unwrap(), text.as_bytes(), "the test's own codes");
        out
    }

    /// A literal `:authority` with incremental indexing, named by the static table's
    /// index or, with `named`, by a literal name.
    fn authority_field(value: &[u8], huffman: bool, named: bool) -> Vec<u8> {
        assert!(value.len() < 127);
        let name = if named { [&[0x40, 10][..], b":authority"].concat() } else { vec![0x40 | AUTHORITY_INDEX as u8] };
        [name, vec![value.len() as u8 | if huffman { 0x80 } else { 0 }], value.to_vec()].concat()
    }

    fn request_block(encoder: &mut fluke_hpack::Encoder, authority: Vec<u8>) -> Vec<u8> {
        let head: Vec<(&[u8], &[u8])> = vec![(b":method", b"POST"), (b":scheme", b"http")];
        let tail: Vec<(&[u8], &[u8])> =
            vec![(b":path", b"/etcdserverpb.KV/Put"), (b"content-type", b"application/grpc")];
        [encoder.encode(head), authority, encoder.encode(tail)].concat()
    }

    fn decode_all(decoder: &mut fluke_hpack::Decoder, block: &[u8]) -> Vec<(String, String)> {
        let fields = decoder.decode(block).unwrap();
        fields.into_iter().map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())).collect()
    }

    #[test]
    fn codes_of_any_length_decode_to_valid_authorities_as_long() {
        for chars in 1usize..60 {
            for bytes in (5 * chars).div_ceil(8)..=(12 * chars) / 8 {
                let code = huffman_of_length(chars, bytes).unwrap_or_else(|| panic!("{chars} in {bytes} bytes"));
                assert_eq!(code.len(), bytes);
                let text = HuffmanDecoder::new().decode(&code).unwrap();
                assert_eq!(text.len(), chars);
                assert!(valid_authority(&text), "{:?}", String::from_utf8_lossy(&text));
            }
        }
    }

    #[test]
    fn an_invalid_authority_is_mended_in_place_and_later_references_find_the_mended_one() {
        for (value, huffman_coded, named) in [
            (b"http://127.0.0.1:2379".to_vec(), false, false),
            (b"http://127.0.0.1:2379".to_vec(), false, true),
            (huffman("#abx//ab"), true, false),
            (huffman("ab/ba"), true, true),
        ] {
            let mut encoder = fluke_hpack::Encoder::new();
            let mut block = request_block(&mut encoder, authority_field(&value, huffman_coded, named));
            let before = block.len();
            mend_block(&mut block, &mut Valid::default());
            assert_eq!(block.len(), before);
            let mut decoder = fluke_hpack::Decoder::new();
            let fields = decode_all(&mut decoder, &block);
            let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, [":method", ":scheme", ":authority", ":path", "content-type"]);
            let authority = &fields[2].1;
            assert!(valid_authority(authority.as_bytes()), "{authority:?}");
            let original = if huffman_coded { HuffmanDecoder::new().decode(&value).unwrap() } else { value };
            assert_eq!(authority.len(), original.len(), "the table entry keeps its size");
            assert_eq!(fields[3].1, "/etcdserverpb.KV/Put");

            // The next request names the authority by its index in the dynamic table (the
            // encoder indexes nothing else here: the newest entry is 62).
            let mut next = vec![0x80 | 62];
            mend_block(&mut next, &mut Valid::default());
            let again = decode_all(&mut decoder, &next);
            assert_eq!(again, vec![(":authority".to_string(), authority.clone())]);
        }
    }

    #[test]
    fn valid_authorities_and_other_fields_are_left_alone() {
        let mut encoder = fluke_hpack::Encoder::new();
        let mut block = request_block(&mut encoder, authority_field(b"127.0.0.1:2379", false, false));
        let original = block.clone();
        let mut valid = Valid::default();
        mend_block(&mut block, &mut valid);
        assert_eq!(block, original);
        assert_eq!(valid.encoded, b"127.0.0.1:2379", "remembered as valid");
        mend_block(&mut block, &mut valid);
        assert_eq!(block, original);
        // A connection that sends another, invalid, authority later still has it mended.
        let mut other = authority_field(b"http://127.0.0.1:2379", false, false);
        mend_block(&mut other, &mut valid);
        assert_eq!(other, authority_field(&[b'x'; 21], false, false));
        let mut cut = original[..original.len() - 3].to_vec();
        mend_block(&mut cut, &mut Valid::default());
        assert_eq!(cut, original[..original.len() - 3], "a block cut short is left as it is");
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test]
    async fn a_headers_frame_split_across_reads_is_held_whole_and_mended() {
        let mut encoder = fluke_hpack::Encoder::new();
        let block = request_block(&mut encoder, authority_field(b"http://127.0.0.1:2379", false, false));
        let mut padded = vec![3u8];
        padded.extend_from_slice(&block);
        padded.extend_from_slice(&[0, 0, 0]);
        let stream = [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            frame(0x4, 0, 0, &[0; 6]),
            frame(HEADERS, 0x4 | PADDED, 1, &padded),
            frame(0x0, 0x1, 1, b"\0\0\0\0\x05hello"),
        ]
        .concat();
        let headers_at = 24 + 15;
        let (mut tx, rx) = tokio::io::duplex(64 << 10);
        let mut conn = LenientAuthority::new(rx);
        let writer = tokio::spawn(async move {
            // The HEADERS frame arrives in three parts.
            for part in
                [&stream[..headers_at + 5], &stream[headers_at + 5..headers_at + 30], &stream[headers_at + 30..]]
            {
                tx.write_all(part).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            stream
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 16];
        loop {
            let n = conn.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            if got.len() >= headers_at + 9 + padded.len() + 19 {
                break;
            }
        }
        let sent = writer.await.unwrap();
        assert_eq!(got.len(), sent.len());
        let payload = &got[headers_at + 9..headers_at + 9 + padded.len()];
        let fields = decode_all(&mut fluke_hpack::Decoder::new(), &payload[1..payload.len() - 3]);
        assert_eq!(fields[2], (":authority".to_string(), "x".repeat(21)));
        assert_eq!(&got[headers_at + 9 + padded.len()..], &sent[headers_at + 9 + padded.len()..], "DATA untouched");
        assert_eq!(&got[..headers_at], &sent[..headers_at]);
    }
}
