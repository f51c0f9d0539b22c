//! hawser end-to-end suite. Not built yet.
