//! End-to-end tests: real nats-server, the four services and the OpenSIPS emulator as separate
//! processes, driven only through their real interfaces (WebSocket, NATS, UDP MI).

mod call_events;
mod commands;
mod event_fanout;
mod events;
mod failures;
mod gateway_hardening;
mod ingest_hardening;
mod input_checks;
mod lost_and_fair;
mod mi_client;
mod nats_boundary;
mod nodes;
mod openapi;
mod ops;
mod overload;
mod protocol;
mod resilience;
mod rest;
mod rolling;
mod sessions;
mod tenants;
mod traces;
mod webhooks;
