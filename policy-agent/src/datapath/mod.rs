//! Loading the classifier, attaching it to interfaces, and typed access to its maps.
