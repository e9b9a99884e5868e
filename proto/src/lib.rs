//! Protobuf messages exchanged by callapi services over NATS, generated from `proto/callapi/v1`.
#![allow(missing_docs)]

/// Version 1 of the callapi wire messages.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/callapi.v1.rs"));
}
