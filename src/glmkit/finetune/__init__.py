"""Fine-tuning: training data rendered by the same chat formats as inference (data.py), LoRA and P-Tuning v2 on
the same model code (models/lora.py, train.py), evaluation batched through the engine (evaluate.py, metrics.py).
"""
