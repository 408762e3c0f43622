//! placeholder until the sandbox tests land
