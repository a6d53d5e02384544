"""ssl_ema: semi-supervised image classification on TensorFlow 2, built around an EMA teacher."""
import os

# TensorFlow's C++ start-up chatter (CPU feature notices, oneDNN) hides the progress lines;
# users who want it set TF_CPP_MIN_LOG_LEVEL themselves.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
