//! The framing of QEMU's `-netdev stream`: each Ethernet frame is preceded by its
//! length as a 32-bit big-endian integer. The byte stream comes from QEMU, which
//! passes on what the guest sends, so a length is checked before anything is
//! buffered for it: a hostile guest cannot make the gateway allocate or wait for a
//! frame larger than Ethernet allows. A frame over the link's MTU (a guest that
//! raised its own) is skipped as it streams past, never buffered, and the stream
//! goes on: only a length QEMU can never send means the stream itself is broken.

/// The largest frame accepted: a 1500-byte MTU frame with its 14-byte header and a
/// VLAN tag, rounded up. QEMU never sends more for a virtio-net device at MTU 1500.
pub const MAX_FRAME: usize = 1536;

/// The smallest frame: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// The largest length QEMU's stream netdev writes (its packet buffer: 64 KiB plus
/// headroom). Between [`MAX_FRAME`] and this, a frame is real but too big: dropped.
pub const MAX_STREAM_FRAME: usize = 65536 + 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "frame length {0} outside {MIN_FRAME}..={MAX_STREAM_FRAME}; closing the guest's network link"
    )]
    BadLength(usize),
}

/// Reassembles frames from arbitrarily split reads.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Where the unread bytes start; consumed bytes are dropped in one move per push,
    /// not per frame (one read can carry dozens of frames).
    start: usize,
    /// Bytes of an oversized frame still to skip.
    skip: usize,
    /// Oversized frames skipped since the last [`Decoder::take_dropped`], and the
    /// length of the last one.
    dropped: (usize, usize),
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Adds bytes as read from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let skipped = self.skip.min(bytes.len());
        self.skip -= skipped;
        self.buf.extend_from_slice(&bytes[skipped..]);
    }

    /// How many oversized frames were dropped since the last call, and the length of
    /// the last one (for the log), if any were.
    pub fn take_dropped(&mut self) -> Option<(usize, usize)> {
        let d = std::mem::take(&mut self.dropped);
        (d.0 > 0).then_some(d)
    }

    /// The next complete frame, `Ok(None)` while one is incomplete, or an error for a
    /// length no Ethernet frame has (the stream cannot be resynchronised after that).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, Error> {
        loop {
            let rest = &self.buf[self.start..];
            let Some(head) = rest.first_chunk::<4>() else {
                return Ok(None);
            };
            let len = u32::from_be_bytes(*head) as usize;
            if !(MIN_FRAME..=MAX_STREAM_FRAME).contains(&len) {
                return Err(Error::BadLength(len));
            }
            if len <= MAX_FRAME {
                break;
            }
            // Too big for the link: skip what is here of it, and the rest as it comes.
            let here = (rest.len() - 4).min(len);
            self.start += 4 + here;
            self.skip = len - here;
            self.dropped = (self.dropped.0 + 1, len);
        }
        let rest = &self.buf[self.start..];
        let len = u32::from_be_bytes(*rest.first_chunk::<4>().expect("checked")) as usize;
        let Some(frame) = rest.get(4..4 + len) else {
            return Ok(None);
        };
        let frame = frame.to_vec();
        self.start += 4 + len;
        Ok(Some(frame))
    }

    /// Bytes held for an incomplete frame (bounded by `4 + MAX_FRAME` plus one read).
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// One frame with its length prefix, as QEMU expects it.
pub fn encode(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + frame.len());
    encode_into(frame, &mut out);
    out
}

/// [`encode`], appended to `out` (for writing many frames at once).
pub fn encode_into(frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(n: usize, fill: u8) -> Vec<u8> {
        vec![fill; n]
    }

    #[test]
    fn frames_split_anywhere_come_out_whole() {
        let frames = [frame(14, 1), frame(60, 2), frame(MAX_FRAME, 3)];
        let stream: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
        for split in 0..stream.len() {
            let mut d = Decoder::new();
            d.push(&stream[..split]);
            let mut got = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            d.push(&stream[split..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got, frames);
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn impossible_lengths_are_errors_before_buffering() {
        let mut d = Decoder::new();
        d.push(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d.next_frame(), Err(Error::BadLength(u32::MAX as usize)));
        let mut d = Decoder::new();
        d.push(&encode(&[0; 13]));
        assert_eq!(d.next_frame(), Err(Error::BadLength(13)));
        let mut d = Decoder::new();
        d.push(&((MAX_STREAM_FRAME + 1) as u32).to_be_bytes());
        assert_eq!(d.next_frame(), Err(Error::BadLength(MAX_STREAM_FRAME + 1)));
    }

    #[test]
    fn oversized_frames_are_skipped_anywhere_they_are_cut() {
        let frames = [frame(60, 1), frame(9014, 2), frame(MAX_FRAME, 3)];
        let stream: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
        for split in (0..stream.len()).step_by(7) {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                d.push(part);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
                assert!(d.pending() <= 4 + MAX_FRAME, "{split}: {}", d.pending());
            }
            assert_eq!(got, [frames[0].clone(), frames[2].clone()], "{split}");
            assert_eq!(d.take_dropped(), Some((1, 9014)));
            assert_eq!(d.take_dropped(), None);
        }
    }

    proptest! {
        /// Any bytes, split anyhow: never a panic, every frame within bounds, and the
        /// buffer never holds more than one frame's worth beyond what was pushed last.
        #[test]
        fn arbitrary_input_never_panics(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..20)) {
            let mut d = Decoder::new();
            'outer: for c in &chunks {
                d.push(c);
                loop {
                    match d.next_frame() {
                        Ok(Some(f)) => prop_assert!((MIN_FRAME..=MAX_FRAME).contains(&f.len())),
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
                prop_assert!(d.pending() <= 4 + MAX_FRAME + c.len());
            }
        }

        #[test]
        fn round_trip(frames in prop::collection::vec(prop::collection::vec(any::<u8>(), MIN_FRAME..=MAX_FRAME), 0..8), cut in any::<prop::sample::Index>()) {
            let stream: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
            let at = if stream.is_empty() { 0 } else { cut.index(stream.len()) };
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for part in [&stream[..at], &stream[at..]] {
                d.push(part);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            prop_assert_eq!(got, frames);
        }
    }
}
