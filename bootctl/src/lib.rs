//! bootctl
