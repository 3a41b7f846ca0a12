//! The second link: Ethernet frames over a stream socket, each after a
//! 4-byte big-endian length (what QEMU's `-netdev stream` and `-netdev
//! socket` speak). The microvm tier hands QEMU one end of a socketpair
//! and the stack the other, instead of a TAP device.
//!
//! Sans-IO and bounded: [`Decoder`] holds at most one frame of the largest
//! size the link allows plus its header, whatever the peer writes. A
//! length above that bound is not an error that ends the link: its bytes
//! are skipped (counted in [`Decoder::oversized`]) and the next header is
//! read after them, so a peer cannot make the stack allocate or desync. A
//! zero length is an empty frame, skipped too. A stream that ends inside
//! a frame simply leaves the frame unfinished ([`Decoder::partial`]).
//! [`Encoder`] keeps at most one frame that the socket did not take in
//! full, so a peer that stops reading stops the stack's writes (its
//! queue towards the link is bounded) instead of growing memory.

/// Bytes of the length before each frame.
pub const HEADER: usize = 4;

/// Reassembles frames from a byte stream.
#[derive(Debug)]
pub struct Decoder {
    /// `HEADER + max_frame` bytes: a header and at most one frame.
    buf: Vec<u8>,
    /// Bytes of `buf` filled.
    filled: usize,
    /// Bytes still to skip of an oversized frame.
    skip: usize,
    max_frame: usize,
    oversized: u64,
}

impl Decoder {
    /// A decoder for frames of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Decoder {
        Decoder {
            buf: vec![0; HEADER + max_frame],
            filled: 0,
            skip: 0,
            max_frame,
            oversized: 0,
        }
    }

    /// Where the next read from the stream goes (never empty).
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf[self.filled..]
    }

    /// Frames announced with a length above the bound, skipped so far.
    pub fn oversized(&self) -> u64 {
        self.oversized
    }

    /// Whether bytes of an unfinished frame (or header) are held.
    pub fn partial(&self) -> bool {
        self.filled > 0 || self.skip > 0
    }

    /// Takes `n` bytes read into [`Decoder::space`] and calls `frame` for
    /// every frame they complete, in order.
    pub fn filled(&mut self, n: usize, mut frame: impl FnMut(&[u8])) {
        self.filled = (self.filled + n).min(self.buf.len());
        let mut at = 0;
        loop {
            if self.skip > 0 {
                let k = self.skip.min(self.filled - at);
                self.skip -= k;
                at += k;
                if self.skip > 0 {
                    break;
                }
            }
            let Some(head) = self
                .buf
                .get(at..at + HEADER)
                .filter(|_| at + HEADER <= self.filled)
            else {
                break;
            };
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            if len > self.max_frame {
                self.oversized += 1;
                self.skip = len;
                at += HEADER;
                continue;
            }
            if at + HEADER + len > self.filled {
                break;
            }
            if len > 0 {
                frame(&self.buf[at + HEADER..at + HEADER + len]);
            }
            at += HEADER + len;
        }
        // Keep the unfinished rest at the start (at most one header and
        // one frame: `buf` holds exactly that).
        self.buf.copy_within(at..self.filled, 0);
        self.filled -= at;
    }
}

/// What [`Encoder::send`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// All of it went out.
    Whole,
    /// Part (or none) went out; the rest is held until
    /// [`Encoder::flush`] gets it out. Send nothing new until then.
    Held,
    /// The frame is longer than a length can say: dropped.
    TooLong,
}

/// Writes frames with their length, holding what a non-blocking socket
/// did not take (at most one frame).
#[derive(Debug, Default)]
pub struct Encoder {
    pending: Vec<u8>,
    sent: usize,
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// Whether part of a frame waits for [`Encoder::flush`].
    pub fn busy(&self) -> bool {
        self.sent < self.pending.len()
    }

    /// Writes `frame` with `write` (which takes the header and the frame
    /// as two slices and says how many bytes it wrote in all, 0 when the
    /// socket takes nothing now). Call only when not [`Encoder::busy`].
    pub fn send(
        &mut self,
        frame: &[u8],
        write: impl FnOnce(&[u8], &[u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<Sent> {
        let Ok(len) = u32::try_from(frame.len()) else {
            return Ok(Sent::TooLong);
        };
        let head = len.to_be_bytes();
        let n = write(&head, frame)?.min(HEADER + frame.len());
        if n == HEADER + frame.len() {
            return Ok(Sent::Whole);
        }
        self.pending.clear();
        self.pending.extend_from_slice(&head);
        self.pending.extend_from_slice(frame);
        self.sent = n;
        Ok(Sent::Held)
    }

    /// Writes what is held with `write` (bytes written, 0 when the socket
    /// takes nothing now); true once nothing is held.
    pub fn flush(
        &mut self,
        write: impl FnOnce(&[u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<bool> {
        if self.busy() {
            let n = write(&self.pending[self.sent..])?;
            self.sent = (self.sent + n).min(self.pending.len());
        }
        if !self.busy() {
            self.pending.clear();
            self.sent = 0;
            return Ok(true);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&(f.len() as u32).to_be_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    /// Feeds `bytes` in pieces of `chunk`, collecting the frames.
    fn decode(d: &mut Decoder, bytes: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let space = d.space();
            let n = chunk.min(space.len()).min(rest.len());
            space[..n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            d.filled(n, |f| out.push(f.to_vec()));
        }
        out
    }

    #[test]
    fn frames_come_out_whatever_the_read_sizes() {
        let a = vec![1u8; 60];
        let b = vec![2u8; 1514];
        let c = vec![3u8; 100];
        let bytes = framed(&[&a, &b, &c]);
        for chunk in [1, 3, 4, 5, 64, 1518, 4096] {
            let mut d = Decoder::new(1514);
            let got = decode(&mut d, &bytes, chunk);
            assert_eq!(got, vec![a.clone(), b.clone(), c.clone()], "chunk {chunk}");
            assert!(!d.partial());
        }
    }

    #[test]
    fn an_oversized_length_is_skipped_not_held() {
        let big = vec![9u8; 5000];
        let ok = vec![7u8; 64];
        let bytes = framed(&[&ok, &big, &ok]);
        for chunk in [1, 7, 100, 10_000] {
            let mut d = Decoder::new(1514);
            let got = decode(&mut d, &bytes, chunk);
            assert_eq!(got, vec![ok.clone(), ok.clone()], "chunk {chunk}");
            assert_eq!(d.oversized(), 1);
            // The buffer never grew past one frame and a header.
            assert_eq!(d.buf.len(), HEADER + 1514);
        }
    }

    #[test]
    fn a_huge_length_allocates_nothing() {
        let mut d = Decoder::new(1514);
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 3000]);
        assert!(decode(&mut d, &bytes, 512).is_empty());
        assert_eq!(d.oversized(), 1);
        assert!(d.partial(), "still skipping");
        assert_eq!(d.buf.len(), HEADER + 1514);
    }

    #[test]
    fn empty_and_truncated_frames() {
        let mut d = Decoder::new(1514);
        let mut bytes = framed(&[&[], &[5u8; 10]]);
        // A header and half a frame: held, not delivered.
        bytes.extend_from_slice(&20u32.to_be_bytes());
        bytes.extend_from_slice(&[6u8; 10]);
        let got = decode(&mut d, &bytes, 3);
        assert_eq!(got, vec![vec![5u8; 10]]);
        assert!(d.partial());
        // The rest completes it.
        let got = decode(&mut d, &[6u8; 10], 4);
        assert_eq!(got, vec![vec![6u8; 20]]);
        assert!(!d.partial());
    }

    #[test]
    fn a_frame_at_the_bound_fits() {
        let mut d = Decoder::new(1514);
        let f = vec![1u8; 1514];
        let got = decode(&mut d, &framed(&[&f, &f]), 10_000);
        assert_eq!(got.len(), 2);
        assert_eq!(d.oversized(), 0);
    }

    #[test]
    fn the_encoder_holds_one_partial_frame() {
        let mut e = Encoder::new();
        let mut wire = Vec::new();
        let f = vec![4u8; 100];
        // The socket takes 10 bytes, then nothing, then the rest.
        let r = e
            .send(&f, |h, b| {
                let all = [h, b].concat();
                wire.extend_from_slice(&all[..10]);
                Ok(10)
            })
            .unwrap();
        assert_eq!(r, Sent::Held);
        assert!(e.busy());
        assert!(!e.flush(|_| Ok(0)).unwrap());
        assert!(e
            .flush(|rest| {
                wire.extend_from_slice(rest);
                Ok(rest.len())
            })
            .unwrap());
        assert!(!e.busy());
        let r = e
            .send(&f, |h, b| {
                wire.extend_from_slice(h);
                wire.extend_from_slice(b);
                Ok(h.len() + b.len())
            })
            .unwrap();
        assert_eq!(r, Sent::Whole);
        let mut d = Decoder::new(1514);
        assert_eq!(decode(&mut d, &wire, 33), vec![f.clone(), f]);
    }
}
