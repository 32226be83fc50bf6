//! mor-model
