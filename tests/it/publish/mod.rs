//! The apt publishing library against real tools: `.deb`s read like
//! `dpkg-deb` reads them, and repos that real `gpgv` and `apt-get` accept
//! (or refuse, when tampered with).

mod apt_repo;
mod deb_read;
