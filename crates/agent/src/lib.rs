#![forbid(unsafe_code)]

pub mod identity;
