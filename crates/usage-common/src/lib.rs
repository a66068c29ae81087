//! Small leaves both usage servers are built from, each knowing nothing of the agent or the
//! receiver: the bounded HTTP/1.1 server every listener runs ([`server`]), a server's
//! routes as one table ([`routes`]), credential checks and the throttle of failed ones
//! ([`credentials`]), the log subscriber of both binaries ([`logging`]), opening SQLite for
//! a full sync ([`gather_vfs`]), the integrity check that refuses a damaged SQLite file
//! ([`sqlite_check`]), files only their owner reads ([`private_file`]) and TOML mistakes
//! placed at their line and key ([`toml_place`]).

pub mod credentials;
pub mod gather_vfs;
pub mod logging;
pub mod private_file;
pub mod routes;
pub mod server;
pub mod sqlite_check;
pub mod toml_place;
