//! The one streaming masker: stored credentials masked in a byte stream as
//! it passes (payload capture, HTTP response bodies), with the tail that
//! could start a stored value held back until more arrives, so a value split
//! across two reads is masked as a whole.

use std::sync::Arc;

use crate::secrets::Masker;

pub struct StreamMasker {
    masker: Arc<dyn Masker>,
    pending: Vec<u8>,
}

impl StreamMasker {
    pub fn new(masker: Arc<dyn Masker>) -> Self {
        StreamMasker {
            masker,
            pending: Vec::new(),
        }
    }

    /// Adds bytes to the stream; whether anything was masked.
    pub fn push(&mut self, data: &[u8]) -> bool {
        self.pending.extend_from_slice(data);
        self.masker.mask(&mut self.pending)
    }

    /// The masked bytes that can go now: all but the tail that could start
    /// a stored value.
    pub fn ready(&mut self) -> Option<Vec<u8>> {
        let keep = self.masker.holdback(&self.pending);
        if self.pending.len() <= keep {
            return None;
        }
        let rest = self.pending.split_off(self.pending.len() - keep);
        Some(std::mem::replace(&mut self.pending, rest))
    }

    /// Everything held back (the stream ended).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// Bytes held back.
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    /// Drops what is held back (the stream failed).
    pub fn clear(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::{Secret, SecretMasker};

    #[test]
    fn a_value_split_anywhere_is_masked_and_nothing_else_is_delayed() {
        let secret = "hunter2-db-pass";
        let text = format!("a={secret}; b=hunt c={secret}");
        let masker: Arc<dyn Masker> = Arc::new(SecretMasker::new(&[Secret::for_tests(secret)]));
        for cut in 0..text.len() {
            let mut m = StreamMasker::new(masker.clone());
            let mut out = Vec::new();
            for part in [&text.as_bytes()[..cut], &text.as_bytes()[cut..]] {
                m.push(part);
                if let Some(r) = m.ready() {
                    out.extend(r);
                }
            }
            out.extend(m.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "a=***************; b=hunt c=***************",
                "cut at {cut}"
            );
        }
        // Bytes that cannot start a value are not held back.
        let mut m = StreamMasker::new(masker);
        m.push(b"plain text x");
        assert_eq!(m.ready().as_deref(), Some(&b"plain text x"[..]));
        assert_eq!(m.held(), 0);
    }
}
