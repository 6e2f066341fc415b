//! Who a client is: users' names and passwords, credentials' digests, guests' nicknames.
//! Below the engine, which stores them.

pub mod auth;
pub mod guests;
pub mod password;
