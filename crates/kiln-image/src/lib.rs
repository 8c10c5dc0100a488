//! kiln-image: turns a Dockerfile and its build context into a snapshot image.

pub mod context;
pub mod dockerfile;
