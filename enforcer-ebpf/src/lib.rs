#![no_std]
// This file exists so the crate has a library target (cargo metadata, rust-analyzer).
