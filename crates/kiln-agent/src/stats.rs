//! The guest's own view of itself for the host's metrics (`Request::Stats`): memory from
//! `/proc/meminfo`, the root filesystem from `statvfs("/")`. Nothing here can fail the
//! request: a value that cannot be read is 0.

use kiln_proto::GuestStats;

pub fn read() -> GuestStats {
    let mut stats = GuestStats::default();
    if let Ok(text) = std::fs::read_to_string("/proc/meminfo") {
        stats.mem_total_kib = meminfo_kib(&text, "MemTotal:");
        stats.mem_available_kib = meminfo_kib(&text, "MemAvailable:");
    }
    if let Ok(fs) = nix::sys::statvfs::statvfs("/") {
        let frag = fs.fragment_size();
        stats.disk_total_bytes = fs.blocks().saturating_mul(frag);
        stats.disk_free_bytes = fs.blocks_available().saturating_mul(frag);
    }
    stats
}

/// A `Name:   1234 kB` line's number.
fn meminfo_kib(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_lines_are_read_by_name() {
        let text = "MemTotal:         498532 kB\nMemFree:  100 kB\nMemAvailable:     421992 kB\n";
        assert_eq!(meminfo_kib(text, "MemTotal:"), 498532);
        assert_eq!(meminfo_kib(text, "MemAvailable:"), 421992);
        assert_eq!(meminfo_kib(text, "Cached:"), 0);
        assert_eq!(meminfo_kib("MemTotal: junk kB", "MemTotal:"), 0);
    }

    #[test]
    fn this_machine_reports_something() {
        let s = read();
        assert!(
            s.mem_total_kib > 0 && s.mem_available_kib <= s.mem_total_kib,
            "{s:?}"
        );
        assert!(
            s.disk_total_bytes > 0 && s.disk_free_bytes <= s.disk_total_bytes,
            "{s:?}"
        );
    }
}
