//! How much memory a model needs, and how much the machine has.

use std::fmt;

/// A byte count that prints itself in human units (1.55 GB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if b >= 1e9 {
            write!(f, "{:.2} GB", b / 1e9)
        } else if b >= 1e6 {
            write!(f, "{:.1} MB", b / 1e6)
        } else if b >= 1e3 {
            write!(f, "{:.1} kB", b / 1e3)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

/// A `Key:   N kB` line of a Linux /proc file (meminfo, self/status), in bytes.
pub fn proc_kb(file: &str, key: &str) -> Option<Bytes> {
    let text = std::fs::read_to_string(file).ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(Bytes(kb * 1024))
}

/// Memory the OS can give this process now without swapping, if it can be known.
/// Linux: `MemAvailable` from /proc/meminfo, capped by a cgroup v2 limit when one is set.
pub fn available() -> Option<Bytes> {
    let mut avail = proc_kb("/proc/meminfo", "MemAvailable")?.0;
    let cgroup_limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let cgroup_used = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if let (Some(limit), Some(used)) = (cgroup_limit, cgroup_used) {
        avail = avail.min(limit.saturating_sub(used));
    }
    Some(Bytes(avail))
}

/// Fails early, with both numbers, when `needed` bytes are not available.
pub fn ensure_available(what: &str, needed: Bytes) -> crate::Result<()> {
    match available() {
        Some(have) if have < needed => Err(crate::Error::OutOfMemory {
            what: what.to_string(),
            needed,
            available: have,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_units() {
        assert_eq!(Bytes(1_550_000_000).to_string(), "1.55 GB");
        assert_eq!(Bytes(249_000_000).to_string(), "249.0 MB");
        assert_eq!(Bytes(12).to_string(), "12 B");
    }

    #[test]
    fn refuses_absurd_requests() {
        if available().is_some() {
            let err = ensure_available("test", Bytes(u64::MAX)).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("needs") && msg.contains("available"), "{msg}");
        }
    }
}
