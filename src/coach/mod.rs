//! The coaching domain: personas, prompt assembly for a turn, and session notes.

pub mod notes;
pub mod persona;
pub mod prompt;

pub use persona::{Persona, Personas};
