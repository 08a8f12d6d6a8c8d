//! The f32 CPU reference backend (being written).
