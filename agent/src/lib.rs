//! ddi-agent
