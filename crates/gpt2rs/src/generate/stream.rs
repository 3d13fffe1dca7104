//! Turning generated tokens into text as they arrive: never a broken UTF-8 character
//! (a character split across tokens waits for its last byte), and never text past a stop string
//! (text that could be the start of one waits until it is clearly not).

/// Incremental text of one generated sequence.
#[derive(Debug, Default)]
pub struct TextStream {
    bytes: Vec<u8>,
    stops: Vec<String>,
    /// Decoded text of the complete characters so far.
    text: String,
    /// Bytes of `bytes` already decoded into `text`.
    decoded: usize,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stopped: bool,
}

impl TextStream {
    /// A stream that ends at the first of `stops` (the stop string itself is not part of the text).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Self::default()
        }
    }

    /// Adds a token's bytes; returns the text that is now final, and whether a stop string appeared.
    pub fn push(&mut self, token_bytes: &[u8]) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.bytes.extend_from_slice(token_bytes);
        self.decode_complete();
        if let Some(at) = self.first_stop() {
            self.text.truncate(at);
            self.stopped = true;
            return (self.take_upto(at), true);
        }
        let safe = self.text.len() - self.stop_prefix_len();
        (self.take_upto(safe), false)
    }

    /// Ends the stream: returns everything not yet handed out (a cut character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        if !self.stopped {
            let rest = String::from_utf8_lossy(&self.bytes[self.decoded..]).into_owned();
            self.text.push_str(&rest);
            self.decoded = self.bytes.len();
        }
        self.take_upto(self.text.len())
    }

    /// The whole text so far (up to a stop string, if one was found).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take_upto(&mut self, end: usize) -> String {
        let end = end.max(self.emitted);
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }

    /// Moves every complete character from `bytes` into `text`; invalid bytes become U+FFFD.
    fn decode_complete(&mut self) {
        loop {
            let rest = &self.bytes[self.decoded..];
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    self.text.push_str(s);
                    self.decoded = self.bytes.len();
                    return;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    self.text
                        .push_str(std::str::from_utf8(&rest[..good]).expect("checked valid"));
                    self.decoded += good;
                    match e.error_len() {
                        // Bytes that can never become a character.
                        Some(bad) => {
                            self.text.push(char::REPLACEMENT_CHARACTER);
                            self.decoded += bad;
                        }
                        // An incomplete character at the end: wait for more bytes.
                        None => return,
                    }
                }
            }
        }
    }

    /// Byte offset of the earliest stop string in the text.
    fn first_stop(&self) -> Option<usize> {
        // A stop string can only be new if it ends in text not yet handed out.
        let longest = self.stops.iter().map(String::len).max()?;
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }

    /// Length of the longest end of the text that could begin a stop string.
    fn stop_prefix_len(&self) -> usize {
        let n = self.text.len();
        let mut best = 0;
        for s in &self.stops {
            for k in (best + 1..s.len().min(n + 1)).rev() {
                if self.text.is_char_boundary(n - k)
                    && s.as_bytes().starts_with(&self.text.as_bytes()[n - k..])
                {
                    best = k;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_split_characters() {
        let crab = "🦀".as_bytes(); // 4 bytes
        let mut s = TextStream::new(&[]);
        assert_eq!(s.push(b"a"), ("a".into(), false));
        assert_eq!(s.push(&crab[..1]), ("".into(), false));
        assert_eq!(s.push(&crab[1..3]), ("".into(), false));
        assert_eq!(s.push(&crab[3..]), ("🦀".into(), false));
        assert_eq!(s.push(&[0xE6]), ("".into(), false)); // half of a CJK character
        assert_eq!(s.finish(), "\u{FFFD}");
        assert_eq!(s.text(), "a🦀\u{FFFD}");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut s = TextStream::new(&[]);
        assert_eq!(s.push(&[b'x', 0xFF, b'y']), ("x\u{FFFD}y".into(), false));
    }

    #[test]
    fn stops_at_stop_strings_split_over_tokens() {
        let mut s = TextStream::new(&["\n\n".to_string(), "END".to_string()]);
        assert_eq!(s.push(b"Hello"), ("Hello".into(), false));
        assert_eq!(s.push(b" E"), (" ".into(), false)); // "E" may start "END"
        assert_eq!(s.push(b"N"), ("".into(), false));
        assert_eq!(s.push(b"Dless"), ("".into(), true));
        assert_eq!(s.text(), "Hello ");
        assert_eq!(s.finish(), "");

        let mut s = TextStream::new(&["END".to_string()]);
        assert_eq!(s.push(b"EN"), ("".into(), false));
        assert_eq!(s.push(b"a"), ("ENa".into(), false)); // not a stop after all
        assert_eq!(s.push(b"x\n"), ("x\n".into(), false));
        assert_eq!(s.finish(), "");
        assert_eq!(s.text(), "ENax\n");
    }
}
