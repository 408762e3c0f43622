//! kiln: a package build service in one binary.
