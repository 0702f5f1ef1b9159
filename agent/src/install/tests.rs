//! Pipeline tests against a hand-written local HTTP server.
