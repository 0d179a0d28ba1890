from guided_concepts.capture.attention import AttentionStore, CaptureProcessor, capture_attention, choose_layers, cross_attention_layers, install_capture

__all__ = ["AttentionStore", "CaptureProcessor", "capture_attention", "choose_layers", "cross_attention_layers",
           "install_capture"]
