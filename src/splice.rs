//! Outgoing byte streams spliced from a read buffer and a few bytes the proxy makes.
//!
//! The relay forwards what it read without copying it: an [`Out`] is a queue of segments
//! that say "the next n bytes of the read buffer" (sent or dropped) or "the next n bytes the
//! proxy wrote" (a renamed statement, an injected Parse, a reply the proxy answers itself).
//! One vectored write sends as many segments as the socket takes.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::tls::Stream;
use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;

/// One piece of an outgoing stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seg {
    /// The next n bytes of the read buffer, sent.
    Buf(usize),
    /// The next n bytes of the read buffer, dropped.
    Skip(usize),
    /// The next n bytes of [`Out::own`], sent.
    Own(usize),
}

/// Segments waiting to be written, in order.
#[derive(Debug, Default)]
pub struct Out {
    segs: VecDeque<Seg>,
    /// Bytes made by the proxy; consumed from the front as `Own` segments are written.
    own: BytesMut,
    /// Written to a TLS stream, which may hold the last bytes back until flushed.
    unflushed: bool,
}

/// An arena that grew past this (many statements prepared in one batch) is freed once
/// empty rather than kept for the connection's life.
const MAX_KEPT_OWN: usize = 64 * 1024;

/// Most slices handed to one vectored write.
const MAX_SLICES: usize = 16;

impl Out {
    /// Nothing left to write (or, on TLS, to flush).
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty() && !self.unflushed
    }

    /// Bytes of the read buffer the queue covers (sent or dropped).
    pub fn buf_len(&self) -> usize {
        self.segs
            .iter()
            .map(|s| match s {
                Seg::Buf(n) | Seg::Skip(n) => *n,
                Seg::Own(_) => 0,
            })
            .sum()
    }

    fn push(&mut self, seg: Seg) {
        match (self.segs.back_mut(), seg) {
            (Some(Seg::Buf(a)), Seg::Buf(b))
            | (Some(Seg::Skip(a)), Seg::Skip(b))
            | (Some(Seg::Own(a)), Seg::Own(b)) => *a += b,
            _ => self.segs.push_back(seg),
        }
    }

    /// Sends the next `n` bytes of the read buffer.
    #[inline]
    pub fn buf(&mut self, n: usize) {
        if n > 0 {
            self.push(Seg::Buf(n));
        }
    }

    /// Drops the next `n` bytes of the read buffer.
    pub fn skip(&mut self, n: usize) {
        if n > 0 {
            self.push(Seg::Skip(n));
        }
    }

    /// Sends bytes the proxy made.
    pub fn own(&mut self, bytes: &[u8]) {
        self.own_with(|b| b.extend_from_slice(bytes));
    }

    /// Sends bytes the proxy writes with `f`.
    pub fn own_with(&mut self, f: impl FnOnce(&mut BytesMut)) {
        let before = self.own.len();
        f(&mut self.own);
        let n = self.own.len() - before;
        if n > 0 {
            self.push(Seg::Own(n));
        }
    }

    /// Moves what is queued, which must be only bytes the proxy made, to `dst`.
    pub fn take_own(&mut self, dst: &mut BytesMut) {
        debug_assert!(self.segs.iter().all(|s| matches!(s, Seg::Own(_))));
        dst.extend_from_slice(&self.own);
        self.segs.clear();
        self.reset_own();
    }

    /// Empties the arena: its space is reused from the start, or freed if it grew large.
    fn reset_own(&mut self) {
        if self.own.capacity() > MAX_KEPT_OWN {
            self.own = BytesMut::new();
        } else {
            self.own.clear();
        }
    }

    /// Forgets everything queued; returns how many read-buffer bytes it covered (the
    /// caller drops them from its buffer).
    pub fn clear(&mut self) -> usize {
        let n = self.buf_len();
        self.segs.clear();
        self.unflushed = false;
        self.reset_own();
        n
    }

    /// Drops leading `Skip` segments from `buf`; returns the bytes dropped.
    fn drop_skips(&mut self, buf: &mut BytesMut) -> usize {
        let mut dropped = 0;
        while let Some(Seg::Skip(n)) = self.segs.front() {
            buf.advance(*n);
            dropped += *n;
            self.segs.pop_front();
        }
        dropped
    }

    /// One write of the queued segments (the first is not a `Skip`).
    #[inline]
    fn write_slices(
        &self,
        stream: &mut Stream,
        buf: &BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        if self.segs.len() == 1 {
            // The common case: one run of forwarded bytes (or of the proxy's own).
            let bytes = match self.segs[0] {
                Seg::Buf(n) => &buf[..n],
                Seg::Own(n) => &self.own[..n],
                Seg::Skip(_) => &[][..],
            };
            return Pin::new(&mut *stream).poll_write(cx, bytes);
        }
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut count = 0;
        let (mut at_buf, mut at_own) = (0, 0);
        for seg in &self.segs {
            if count == MAX_SLICES {
                break;
            }
            match *seg {
                Seg::Buf(n) => {
                    slices[count] = IoSlice::new(&buf[at_buf..at_buf + n]);
                    count += 1;
                    at_buf += n;
                }
                Seg::Skip(n) => at_buf += n,
                Seg::Own(n) => {
                    slices[count] = IoSlice::new(&self.own[at_own..at_own + n]);
                    count += 1;
                    at_own += n;
                }
            }
        }
        Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..count])
    }

    /// Writes what the socket takes. Returns (bytes of `buf` consumed, bytes written); `buf`
    /// is advanced past what was consumed.
    pub fn poll_write(
        &mut self,
        stream: &mut Stream,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<(usize, usize)>> {
        if self.segs.is_empty() {
            // All written to TLS: what it holds back goes out now.
            std::task::ready!(stream.poll_flush_pending(cx))?;
            self.unflushed = false;
            return Poll::Ready(Ok((0, 0)));
        }
        self.unflushed |= stream.is_tls();
        if let (1, Some(&Seg::Buf(n))) = (self.segs.len(), self.segs.front()) {
            // The common case: one run of forwarded bytes.
            let w = match Pin::new(&mut *stream).poll_write(cx, &buf[..n]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(w)) => w,
                other => return other.map_ok(|_| (0, 0)),
            };
            buf.advance(w);
            if w == n {
                self.segs.clear();
                self.own.clear();
            } else {
                self.segs[0] = Seg::Buf(n - w);
            }
            return Poll::Ready(Ok((w, w)));
        }
        let mut consumed = self.drop_skips(buf);
        if self.segs.is_empty() {
            return Poll::Ready(Ok((consumed, 0)));
        }
        let written = match self.write_slices(stream, buf, cx) {
            Poll::Pending if consumed > 0 => return Poll::Ready(Ok((consumed, 0))),
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => n,
        };
        let mut left = written;
        let (mut buf_done, mut own_done) = (0, 0);
        loop {
            match self.segs.front_mut() {
                Some(Seg::Skip(n)) => buf_done += *n,
                Some(seg) if left > 0 => {
                    let (n, done) = match seg {
                        Seg::Buf(n) => (n, &mut buf_done),
                        Seg::Own(n) => (n, &mut own_done),
                        Seg::Skip(_) => unreachable!("matched above"),
                    };
                    let take = (*n).min(left);
                    *done += take;
                    left -= take;
                    *n -= take;
                    if *n > 0 {
                        break;
                    }
                }
                _ => break,
            }
            self.segs.pop_front();
        }
        // Read-buffer bytes (sent, and the skips between them) are advanced once.
        buf.advance(buf_done);
        consumed += buf_done;
        if self.segs.is_empty() {
            self.reset_own();
        } else {
            self.own.advance(own_done);
        }
        Poll::Ready(Ok((consumed, written)))
    }
}

impl Out {
    /// The bytes the queue would send, given the read buffer it covers (tests and fuzz
    /// targets).
    #[doc(hidden)]
    pub fn flatten(&self, buf: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        let (mut at_buf, mut at_own) = (0, 0);
        for seg in &self.segs {
            match *seg {
                Seg::Buf(n) => {
                    v.extend_from_slice(&buf[at_buf..at_buf + n]);
                    at_buf += n;
                }
                Seg::Skip(n) => at_buf += n,
                Seg::Own(n) => {
                    v.extend_from_slice(&self.own[at_own..at_own + n]);
                    at_own += n;
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_merge_and_count() {
        let mut o = Out::default();
        o.buf(3);
        o.buf(2);
        o.skip(4);
        o.own(b"xy");
        o.own(b"z");
        o.buf(1);
        assert_eq!(
            o.segs.iter().copied().collect::<Vec<_>>(),
            vec![Seg::Buf(5), Seg::Skip(4), Seg::Own(3), Seg::Buf(1)]
        );
        assert_eq!(o.buf_len(), 10);
        assert_eq!(o.clear(), 10);
        assert!(o.is_empty());
    }

    #[tokio::test]
    async fn writes_spliced_stream() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut a = Stream::Plain(tokio::net::TcpStream::connect(addr).await.unwrap());
        let (mut b, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::from(&b"hello, cruel world!"[..]);
        let mut o = Out::default();
        o.buf(7);
        o.skip(6);
        o.own(b"big ");
        o.buf(6);
        let (consumed, written) = std::future::poll_fn(|cx| o.poll_write(&mut a, &mut buf, cx))
            .await
            .unwrap();
        assert_eq!((consumed, written), (19, 17));
        assert!(o.is_empty() && buf.is_empty());
        let mut got = vec![0u8; 17];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello, big world!");
    }
}
