//! End-to-end tests of the gateway under hostile or unlucky clients (issue 8).
