//! kiln-image: turns a Dockerfile and its build context into a snapshot image.
//!
//! - [`dockerfile`]: the parser (one type per instruction);
//! - [`context`]: zip/tar/dir build contexts, validated, `.dockerignore`;
//! - [`base`]: busybox, Debian (mmdebstrap from the host's apt sources), imported roots;
//! - [`plan`]: variables, COPY sources and step cache keys, before any VM starts;
//! - [`layers`]: the step cache (qcow2 layers);
//! - [`build`]: the bake itself; [`log`]: build logs;
//! - [`saved`]: images saved from a running microVM instead of built.

pub mod base;
pub mod build;
pub mod context;
pub mod dockerfile;
#[doc(hidden)]
pub mod fuzzing;
pub mod layers;
pub mod log;
pub mod plan;
pub mod saved;

pub use build::{BuildError, BuildSpec, Builder, ImageRecord, ImageStatus};
