//! End-to-end tests: real node processes on 127.0.0.1, killed with SIGKILL where it matters.
mod access;
mod bad_input;
mod consume;
mod crash;
mod disk_full;
mod failover;
mod functions;
mod mesh;
mod partition;
mod powercut;
mod produce;
mod retention;
mod subscriptions;
mod support;
mod walkthrough;
