# ruff: noqa
# Excerpts of https://github.com/mlfoundations/task_vectors at commit 826a64c67082fab0f40628233287948f0f8d7fa3, copied verbatim
# except for the indentation (they sit in methods there) and `self.classnames` renamed `gtsrb_classnames`:
#   src/datasets/gtsrb.py lines 160-205 (GTSRB class names, in label order)
#   src/datasets/eurosat.py lines 4, 6-12 (pretify_classname) and 44-55 (EuroSAT: folder name, prettified -> class name used)
# tests/test_fusionbench_pool.py compares safemerge/data/templates.py with them. Do not edit: re-copy.

# from https://github.com/openai/CLIP/blob/e184f608c5d5e58165682f7c332c3a8b4c1545f2/data/prompts.md
gtsrb_classnames = [
    'red and white circle 20 kph speed limit',
    'red and white circle 30 kph speed limit',
    'red and white circle 50 kph speed limit',
    'red and white circle 60 kph speed limit',
    'red and white circle 70 kph speed limit',
    'red and white circle 80 kph speed limit',
    'end / de-restriction of 80 kph speed limit',
    'red and white circle 100 kph speed limit',
    'red and white circle 120 kph speed limit',
    'red and white circle red car and black car no passing',
    'red and white circle red truck and black car no passing',
    'red and white triangle road intersection warning',
    'white and yellow diamond priority road',
    'red and white upside down triangle yield right-of-way',
    'stop',
    'empty red and white circle',
    'red and white circle no truck entry',
    'red circle with white horizonal stripe no entry',
    'red and white triangle with exclamation mark warning',
    'red and white triangle with black left curve approaching warning',
    'red and white triangle with black right curve approaching warning',
    'red and white triangle with black double curve approaching warning',
    'red and white triangle rough / bumpy road warning',
    'red and white triangle car skidding / slipping warning',
    'red and white triangle with merging / narrow lanes warning',
    'red and white triangle with person digging / construction / road work warning',
    'red and white triangle with traffic light approaching warning',
    'red and white triangle with person walking warning',
    'red and white triangle with child and person walking warning',
    'red and white triangle with bicyle warning',
    'red and white triangle with snowflake / ice warning',
    'red and white triangle with deer warning',
    'white circle with gray strike bar no speed limit',
    'blue circle with white right turn arrow mandatory',
    'blue circle with white left turn arrow mandatory',
    'blue circle with white forward arrow mandatory',
    'blue circle with white forward or right turn arrow mandatory',
    'blue circle with white forward or left turn arrow mandatory',
    'blue circle with white keep right arrow mandatory',
    'blue circle with white keep left arrow mandatory',
    'blue circle with white arrows indicating a traffic circle',
    'white circle with gray strike bar indicating no passing for cars has ended',
    'white circle with gray strike bar indicating no passing for trucks has ended',
]

import re
def pretify_classname(classname):
    l = re.findall(r'[A-Z](?:[a-z]+|[A-Z]*(?=[A-Z]|$))', classname)
    l = [i.lower() for i in l]
    out = ' '.join(l)
    if out.endswith('al'):
        return out + ' area'
    return out


ours_to_open_ai = {
    'annual crop': 'annual crop land',
    'forest': 'forest',
    'herbaceous vegetation': 'brushland or shrubland',
    'highway': 'highway or road',
    'industrial area': 'industrial buildings or commercial buildings',
    'pasture': 'pasture land',
    'permanent crop': 'permanent crop land',
    'residential area': 'residential buildings or homes or apartments',
    'river': 'river',
    'sea lake': 'lake or sea',
}
