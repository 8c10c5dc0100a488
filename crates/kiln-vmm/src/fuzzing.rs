//! Entry points of the fuzz targets (`fuzz/`) and of the corpus replay tests: each feeds
//! untrusted bytes to a parser QEMU's side reaches. None may panic.

/// QMP output (QEMU runs next to a hostile guest): lines read, parsed and classified.
pub fn qmp(data: &[u8]) {
    let _ = crate::qmp::parse_lines(data);
}
