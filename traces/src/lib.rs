//! Every on-disk format.
