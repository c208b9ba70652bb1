// Each test binary compiles this module but uses only part of it.
#![allow(dead_code)]

pub mod fake_graph;
pub mod fake_upstream;
pub mod frozen_clock;
pub mod gmail_api;
pub mod http;
pub mod https;
pub mod interactive;
pub mod log_capture;
pub mod process;
pub mod relay;
pub mod smtp;
pub mod token_endpoint;
pub mod tokens;
pub mod tools;
pub mod wait;
pub mod webhook;
