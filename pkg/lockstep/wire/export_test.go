package wire

// Test hooks.

// ALPN is the protocol name spoken inside TLS.
const ALPN = alpn
