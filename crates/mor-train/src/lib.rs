//! mor-train
