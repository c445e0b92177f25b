"""Training: state → optimizer → pure steps → parallel strategies → loop → checkpoints / transfer."""
