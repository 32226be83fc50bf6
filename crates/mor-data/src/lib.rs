//! mor-data
