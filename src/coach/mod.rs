//! The coaching domain: personas, prompt assembly for a turn, and session notes.

pub mod persona;

pub use persona::{Persona, Personas};
