//! Entry points of the fuzz targets (`fuzz/`) and of the corpus replay tests: each feeds
//! untrusted bytes to a parser QEMU's side reaches. None may panic.

/// QMP output (QEMU runs next to a hostile guest): lines read, parsed and classified.
pub fn qmp(data: &[u8]) {
    let _ = crate::qmp::parse_lines(data);
}

/// A memory diff file (it lives in the microVM's directory, which the jailed QEMU can write):
/// the header and the index after it, each parsed and bounded.
pub fn memdiff(data: &[u8]) {
    let split = data.len().min(40);
    if let Ok(header) = crate::memdiff::Header::parse(&data[..split]) {
        let _ = crate::memdiff::parse_index(&header, &data[split..]);
    }
}

/// QEMU's `/proc/<pid>/smaps` (a process next to the guest): the entry of its first mapping.
pub fn smaps(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let start = text
        .lines()
        .find_map(crate::memdiff::mapping_start)
        .unwrap_or(0);
    let _ = crate::memdiff::parse_smaps_entry(&text, start);
}
