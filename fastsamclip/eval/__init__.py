"""Evaluation: the SAM-CLIP paper's tables for a merged checkpoint and for each teacher.

Tasks (each a module with ``evaluate(model, dataset, dist, ...)``):
- ``classify``: zero-shot top-1 / top-5 (ImageNet, ImageNet-v2, Places365, image folders, CSV);
- ``semantic``: zero-shot semantic segmentation mIoU (VOC, Pascal Context, ADE20K, COCO-Stuff,
  COCO-Panoptic), CLIP head or composed with the SAM head;
- ``instances``: box-prompted mask AP through pycocotools' COCOeval (COCO, LVIS);
- ``retrieval``: image-text recall@K on Karpathy splits (Flickr30k, COCO).

``datasets`` reads the layouts people download; ``models`` puts the merged model and the
teachers behind one interface; ``metrics`` keeps counts exact; ``runner`` shards across
torchrun ranks and reports; ``paper`` holds the paper's numbers; ``sample_datasets`` writes tiny
datasets in every layout; ``cli`` is ``fastsamclip eval``.
"""
