"""`glmkit <command>` implementations that are not user interfaces (serve, info, quantize, generate, cache): thin
wrappers over the layers below, each with add_arguments(parser) and main(args). cli.py dispatches to them."""
