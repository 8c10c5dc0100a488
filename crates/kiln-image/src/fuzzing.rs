//! Entry points of the fuzz targets (`fuzz/`) and of the corpus replay tests: what a client
//! sends to build an image (a Dockerfile, a zip or tar context). None may panic.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::OnceLock;

use crate::context::{BuildContext, ContextLimits};
use crate::dockerfile::Dockerfile;

/// Small limits, so an input cannot make a replay slow.
const LIMITS: ContextLimits = ContextLimits {
    max_total_bytes: 1 << 20,
    max_entries: 256,
};

fn context() -> Option<&'static BuildContext> {
    static CTX: OnceLock<Option<BuildContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        let dir = tempfile::tempdir().ok()?;
        std::fs::write(dir.path().join("app.py"), "print('hi')\n").ok()?;
        std::fs::create_dir(dir.path().join("src")).ok()?;
        std::fs::write(dir.path().join("src/a.txt"), "a\n").ok()?;
        BuildContext::from_dir(dir.path(), LIMITS).ok()
    })
    .as_ref()
}

/// A Dockerfile: parsed, then planned (variables expanded, COPY sources matched).
pub fn dockerfile(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(df) = Dockerfile::parse(&text) {
        if let Some(ctx) = context() {
            let args = BTreeMap::from([("A".to_string(), "x".to_string())]);
            let _ = crate::plan::plan(&df, ctx, &args, "base");
        }
    }
}

/// A tar build context.
pub fn context_tar(data: &[u8]) {
    load(data, ".tar");
}

/// A zip build context.
pub fn context_zip(data: &[u8]) {
    load(data, ".zip");
}

fn load(data: &[u8], suffix: &str) {
    let Ok(mut f) = tempfile::Builder::new().suffix(suffix).tempfile() else {
        return;
    };
    if f.write_all(data).is_err() {
        return;
    }
    let _ = BuildContext::load(f.path(), LIMITS);
}
