//! The server's endpoints: the accept loop, the routes and upgrades, the pages.

pub mod http;
pub mod serve;
pub mod web;
